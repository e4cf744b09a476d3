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

#[test]
fn a_crashed_cluster_restarts_on_its_port_with_what_was_committed() {
    let cluster = kiln_pgtest::PgCluster::start_durable().unwrap();
    let url = cluster.database().unwrap();
    kiln_pgtest::query(&url, "CREATE TABLE t (n INT); INSERT INTO t VALUES (7)").unwrap();
    assert_eq!(
        kiln_pgtest::query(&url, "SELECT n, 'a b' FROM t").unwrap(),
        vec![vec!["7".to_string(), "a b".to_string()]]
    );
    cluster.crash().unwrap();
    let down = kiln_pgtest::query(&url, "SELECT 1").unwrap_err();
    assert!(down.contains("failed"), "{down}");
    cluster.restart().unwrap();
    assert_eq!(
        kiln_pgtest::query(&url, "SELECT n FROM t").unwrap(),
        vec![vec!["7".to_string()]]
    );
}
