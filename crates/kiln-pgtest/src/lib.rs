//! A throwaway PostgreSQL cluster for tests: `initdb` in a temp dir, `postgres` on 127.0.0.1
//! and a free port (trust authentication, `fsync=off`), from the installed server binaries
//! (`KILN_PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`, else `pg_config
//! --bindir`). PostgreSQL refuses to run as root: when the tests run as root, the cluster is
//! run by the `postgres` system user (`runuser`), its data dir given to that user.
//!
//! [`shared`] is one cluster per test process; [`PgCluster::database`] makes a new database
//! on it for each test, so tests stay parallel and isolated. A cluster is stopped (`pg_ctl
//! stop -m fast`) and its directory removed when it is dropped, and also when the process
//! that started it ends without dropping it (the shared one lives in a static): a watchdog
//! process reads a pipe only this process holds and stops the cluster at its end of file.
//!
//! Nothing here is skipped when PostgreSQL is missing: starting fails, and so do the tests.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Why a cluster could not be had.
pub type Error = String;

/// Ports tried when the one found free was taken before the server bound it.
const PORT_TRIES: u32 = 5;

/// A running throwaway cluster.
pub struct PgCluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The user the server runs as (`None`: this process's).
    run_as: Option<String>,
    /// Its stdin is the pipe whose end stops the cluster.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
    next_db: AtomicU64,
    /// The server's options (`pg_ctl start -o`): the same port and settings on every start.
    options: String,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The cluster this test process shares (started on first use).
pub fn shared() -> Result<&'static PgCluster, Error> {
    static SHARED: OnceLock<Result<PgCluster, Error>> = OnceLock::new();
    SHARED
        .get_or_init(PgCluster::start)
        .as_ref()
        .map_err(Clone::clone)
}

/// A new empty database on the shared cluster: its URL.
pub fn database() -> Result<String, Error> {
    shared()?.database()
}

/// The directory of the installed server binaries.
pub fn bindir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("KILN_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| format!("no PostgreSQL server binaries (no /usr/lib/postgresql/*/bin/initdb, pg_config: {e}); install postgresql"))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && dir.join("initdb").exists() {
        Ok(dir)
    } else {
        Err("no PostgreSQL server binaries (initdb); install postgresql".into())
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A numeric id of `user` (`id -u` or `id -g`).
fn id_of(user: &str, flag: &str) -> Result<u32, Error> {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .map_err(|e| format!("id {flag} {user}: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("no user {user} to run PostgreSQL as (install postgresql)"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl PgCluster {
    /// Starts a new cluster (see the crate's documentation); `pg_ctl start -w` returns once
    /// the server accepts connections, or fails after its timeout.
    pub fn start() -> Result<PgCluster, Error> {
        PgCluster::start_with(false)
    }

    /// Starts a new cluster that keeps PostgreSQL's durability defaults (`fsync`,
    /// `synchronous_commit` and `full_page_writes` on), as a production server would: for
    /// benchmarks, whose figures would flatter PostgreSQL without them.
    pub fn start_durable() -> Result<PgCluster, Error> {
        PgCluster::start_with(true)
    }

    fn start_with(durable: bool) -> Result<PgCluster, Error> {
        let bindir = bindir()?;
        let root = std::fs::metadata("/proc/self")
            .map_err(|e| format!("/proc/self: {e}"))?
            .uid()
            == 0;
        let run_as = root.then(|| "postgres".to_string());
        let dir = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let data = dir.join("data");
        std::fs::create_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        if let Some(user) = &run_as {
            let (uid, gid) = (id_of(user, "-u")?, id_of(user, "-g")?);
            for p in [&dir, &data] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        // The watchdog first, so the directory goes even if starting fails.
        let mut cluster = PgCluster {
            port: 0,
            watchdog: Mutex::new(None),
            next_db: AtomicU64::new(1),
            options: String::new(),
            bindir,
            dir,
            run_as,
        };
        cluster.spawn_watchdog()?;
        run(
            cluster.command("initdb").arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        )?;
        let relaxed = if durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        // A free port is only free until the server binds it: another process (a client's
        // source port) may take it in between. Then the start fails with "could not bind";
        // a new port is tried, a bounded number of times.
        let mut tries = 0;
        loop {
            tries += 1;
            cluster.port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("a free port: {e}"))?
                .port();
            cluster.options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}{relaxed} \
                 -c max_connections=300",
                cluster.port,
                cluster.dir.display()
            );
            match cluster.start_server() {
                Err(e) if tries < PORT_TRIES && e.contains("could not bind") => {
                    let _ = std::fs::remove_file(cluster.dir.join("server.log"));
                }
                other => return other.map(|()| cluster),
            }
        }
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    fn start_server(&self) -> Result<(), Error> {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-o", &self.options, "-w", "-t", "60", "start"]),
            "pg_ctl start",
        )
        .map_err(|e| format!("{e}\nserver log:\n{}", self.log()))
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: every connection cut, no
    /// checkpoint; the next start recovers from the write-ahead log). For tests of what kiln
    /// does while its database is away. Only a [`PgCluster::start_durable`] cluster keeps
    /// every commit across it: the others commit without waiting for the log
    /// (`synchronous_commit=off`), so their last commits may be lost, as the settings say.
    pub fn crash(&self) -> Result<(), Error> {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["stop", "-m", "immediate", "-w", "-t", "60"]),
            "pg_ctl stop",
        )
    }

    /// Starts the server again on the same port after [`PgCluster::crash`].
    pub fn restart(&self) -> Result<(), Error> {
        self.start_server()
    }

    /// A server binary, run as the cluster's user.
    fn command(&self, bin: &str) -> Command {
        let path = self.bindir.join(bin);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// A process that stops the cluster and removes its directory when its stdin ends: when
    /// this cluster is dropped, or when this process ends.
    fn spawn_watchdog(&mut self) -> Result<(), Error> {
        let data = self.dir.join("data");
        let pg_ctl = self.bindir.join("pg_ctl");
        let as_user = match &self.run_as {
            Some(u) => format!("runuser -u {} -- ", shell_quote(u)),
            None => String::new(),
        };
        let script = format!(
            "cat >/dev/null; if [ -f {pid} ]; then {as_user}{pg_ctl} -D {data} stop -m fast -w -t 60 >/dev/null 2>&1; fi; rm -rf {dir}",
            pid = shell_quote(&data.join("postmaster.pid").to_string_lossy()),
            pg_ctl = shell_quote(&pg_ctl.to_string_lossy()),
            data = shell_quote(&data.to_string_lossy()),
            dir = shell_quote(&self.dir.to_string_lossy()),
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the tests does not kill it before it stops
            // the cluster (its pipe's end tells it when).
            .process_group(0)
            .spawn()
            .map_err(|e| format!("watchdog: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| "watchdog has no stdin".to_string())?;
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = Some((child, stdin));
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The connection settings of database `name` through the server's Unix-domain socket
    /// (in the cluster's directory) instead of TCP, in the key=value form.
    pub fn socket_url(&self, name: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={name}",
            self.dir.display(),
            self.port
        )
    }

    /// Creates a new, empty database and returns its URL.
    pub fn database(&self) -> Result<String, Error> {
        Ok(self.url(&self.create_database()?))
    }

    /// Creates a new, empty database and returns its connection settings through the
    /// server's Unix-domain socket ([`PgCluster::socket_url`]).
    pub fn database_via_socket(&self) -> Result<String, Error> {
        Ok(self.socket_url(&self.create_database()?))
    }

    /// Creates a new, empty database and returns its name.
    pub fn create_database(&self) -> Result<String, Error> {
        let name = format!(
            "kiln_test_{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        run(
            Command::new(self.bindir.join("createdb")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ]),
            "createdb",
        )?;
        Ok(name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let taken = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((mut child, mut stdin)) = taken {
            // End of file: the watchdog stops the cluster and removes the directory; wait for
            // it, so the cluster is gone when drop returns.
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// Runs `sql` on the database at `url` with the server binaries' `psql` (unaligned, tuples
/// only): each row's columns as text. For tests that check what kiln stored.
pub fn query(url: &str, sql: &str) -> Result<Vec<Vec<String>>, Error> {
    let out = Command::new(bindir()?.join("psql"))
        .args([
            url,
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-A",
            "-t",
            "-F",
            "\t",
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}
