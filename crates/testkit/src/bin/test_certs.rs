//! `tether-test-certs DIR`: writes a throwaway CA (`DIR/ca.pem`) and a server certificate for
//! localhost and 127.0.0.1 signed by it (`DIR/server.crt`, `DIR/server.key`), for scripts that test
//! over HTTPS (scripts/sdk-tests --tls). Nothing it makes is meant to outlive the test run.

fn main() {
    const USAGE: &str =
        "usage: tether-test-certs DIR\n\nWrites a throwaway test CA (ca.pem) and a \
certificate for localhost and 127.0.0.1 signed by it (server.crt, server.key) into DIR.";
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let dir = match args.as_slice() {
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{USAGE}");
            return;
        }
        [dir] if !dir.as_encoded_bytes().starts_with(b"-") => dir.clone(),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the directory");
    let ca = tether_testkit::tls::TestCa::new("tether test CA");
    ca.write(&dir, "ca");
    ca.leaf(&["localhost", "127.0.0.1"]).write(&dir, "server");
}
