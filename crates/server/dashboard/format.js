// Times in the viewer's own zone, and durations for people.

const stamp = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric',
  hour: '2-digit', minute: '2-digit', second: '2-digit', timeZoneName: 'short',
});
const clock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

/** The viewer's time zone, e.g. "Europe/Paris". */
export const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;

/** "1 Dec 2026, 21:32:36 CET" for an RFC 3339 instant; "—" for none. */
export function localTime(iso) {
  return iso ? stamp.format(new Date(iso)) : '—';
}

/** "21:32" */
export function clockTime(date) {
  return clock.format(date);
}

/** A duration in milliseconds as "45 s", "3 min 12 s", "2 h 5 min", "3 d 4 h". */
export function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m % 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/** How long ago an instant was; "—" for none. */
export function ago(iso, now = Date.now()) {
  return iso ? duration(now - Date.parse(iso)) : '—';
}

/** A short form of an id for tables ("work_0190…c739e1194"); the full id goes in a title. */
export function shortId(id) {
  const cut = id.indexOf('_') + 1;
  return id.length > cut + 14 ? `${id.slice(0, cut + 4)}…${id.slice(-8)}` : id;
}
