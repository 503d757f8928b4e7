//! `tether-test-certs DIR`: writes a throwaway CA (`DIR/ca.pem`) and a server certificate for
//! localhost and 127.0.0.1 signed by it (`DIR/server.crt`, `DIR/server.key`), for scripts that test
//! over HTTPS (scripts/sdk-tests --tls). Nothing it makes is meant to outlive the test run.

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: tether-test-certs DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the directory");
    let ca = tether_testkit::tls::TestCa::new("tether test CA");
    ca.write(&dir, "ca");
    ca.leaf(&["localhost", "127.0.0.1"]).write(&dir, "server");
}
