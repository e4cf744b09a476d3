//! The throwaway cluster starts, gives out databases, and is gone once dropped.

#![allow(clippy::unwrap_used)]

#[test]
fn a_cluster_starts_gives_databases_and_stops_on_drop() {
    let cluster = kiln_pgtest::PgCluster::start().unwrap();
    let dir = cluster.dir().to_path_buf();
    let port = cluster.port();
    let a = cluster.database().unwrap();
    let b = cluster.database().unwrap();
    assert_ne!(a, b);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(cluster);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
