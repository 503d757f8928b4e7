//! Walking every page of a list endpoint.

use std::collections::HashSet;
use std::future::Future;

use futures::stream::{self, Stream, TryStreamExt};

use crate::error::{Error, Result};
use crate::types::{Page, WorkHistory, WorkTransition};

/// A response that is one page of a longer list.
pub trait Paginated {
    /// What the list holds.
    type Item;
    /// The items of this page and the cursor of the next one (`None` on the last page).
    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
}

/// The cursor after a page: `next_page`, or `last_id` from servers that only send that (D-3 makes
/// them the same value).
fn next_cursor(
    has_more: bool,
    next_page: Option<String>,
    last_id: Option<String>,
) -> Option<String> {
    if has_more {
        next_page.or(last_id)
    } else {
        None
    }
}

impl<T> Paginated for Page<T> {
    type Item = T;
    fn into_parts(self) -> (Vec<T>, Option<String>) {
        let next = next_cursor(self.has_more, self.next_page, self.last_id);
        (self.data, next)
    }
}

impl Paginated for WorkHistory {
    type Item = WorkTransition;
    fn into_parts(self) -> (Vec<WorkTransition>, Option<String>) {
        let next = next_cursor(self.has_more, self.next_page, self.last_id);
        (self.data, next)
    }
}

/// Every item of a list, fetching page after page as the stream is consumed.
///
/// `fetch` gets the cursor of the page to load (`None` for the first) and returns that page; it
/// typically sets [`crate::ListParams::page`] and calls a `list_*` method of a cloned
/// [`crate::Client`]:
///
/// ```no_run
/// # async fn demo(client: tether_client::Client) -> tether_client::Result<()> {
/// use futures::TryStreamExt;
/// use tether_client::{paginate, ListResources};
///
/// let all: Vec<_> = paginate(|cursor| {
///     let client = client.clone();
///     let mut params = ListResources::default();
///     params.list.page = cursor;
///     async move { client.list_environments(&params).await }
/// })
/// .try_collect()
/// .await?;
/// # Ok(()) }
/// ```
///
/// The walk stops at the first error (which the stream yields) and, to protect against a server that
/// hands back a cursor it gave before (which would walk in circles for ever), when any cursor
/// repeats. The stream is not `Unpin`: pin it
/// (`Box::pin`) to call `next` on it.
pub fn paginate<P, F, Fut>(fetch: F) -> impl Stream<Item = Result<P::Item>>
where
    P: Paginated,
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<P>>,
{
    // State: the fetcher, the cursor to load next (`None` once the last page was read) and every
    // cursor loaded so far.
    let start = (fetch, Some(None::<String>), HashSet::<String>::new());
    stream::try_unfold(start, |(mut fetch, cursor, mut seen)| async move {
        let Some(cursor) = cursor else {
            return Ok::<_, Error>(None);
        };
        let (items, next) = fetch(cursor.clone()).await?.into_parts();
        seen.extend(cursor);
        let next = next.filter(|n| !seen.contains(n));
        Ok(Some((items, (fetch, next.map(Some), seen))))
    })
    .map_ok(|items| stream::iter(items.into_iter().map(Ok)))
    .try_flatten()
}

/// Every item of a list, as a vector (see [`paginate`]).
pub async fn collect_all<P, F, Fut>(fetch: F) -> Result<Vec<P::Item>>
where
    P: Paginated,
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<P>>,
{
    paginate(fetch).try_collect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(items: &[u32], next: Option<&str>) -> Page<u32> {
        Page {
            data: items.to_vec(),
            first_id: None,
            last_id: next.map(str::to_owned),
            has_more: next.is_some(),
            next_page: next.map(str::to_owned),
        }
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn walks_every_page_in_order() {
        let all = run(collect_all(|cursor: Option<String>| async move {
            Ok(match cursor.as_deref() {
                None => page(&[1, 2], Some("a")),
                Some("a") => page(&[3, 4], Some("b")),
                _ => page(&[5], None),
            })
        }))
        .unwrap();
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn stops_when_the_cursor_does_not_advance() {
        let mut calls = 0;
        let all = run(collect_all(|_cursor: Option<String>| {
            calls += 1;
            async move { Ok(page(&[7], Some("same"))) }
        }))
        .unwrap();
        assert_eq!(all, vec![7, 7]);
        assert_eq!(calls, 2);
    }

    #[test]
    fn stops_when_the_cursors_go_round_in_a_circle() {
        let mut calls = 0;
        let all = run(collect_all(|cursor: Option<String>| {
            calls += 1;
            async move {
                Ok(match cursor.as_deref() {
                    None | Some("c") => page(&[1], Some("a")),
                    Some("a") => page(&[2], Some("b")),
                    _ => page(&[3], Some("c")),
                })
            }
        }))
        .unwrap();
        assert_eq!(all, vec![1, 2, 3, 1]);
        assert_eq!(calls, 4);
    }
}
