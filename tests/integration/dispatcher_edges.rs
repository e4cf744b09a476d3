//! The dispatcher's edges against a real `kiln serve`: undecodable requests, oversized runner
//! names, two spellings of one repository, a plaintext client on a TLS port.

use std::time::Duration;

use kiln::proto;
use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;
use tonic::Code;
use tonic::codec::{Codec, EncodeBuf, Encoder};

/// Sends raw bytes as the request message of a unary method.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = proto::Build;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<proto::Build>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

fn raw_call(api: &Api, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(api.channel.clone());
    api.rt
        .block_on(async {
            grpc.ready().await.unwrap();
            grpc.unary(
                tonic::Request::new(body),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
        })
        .expect_err("an undecodable request was accepted")
}

#[test]
fn undecodable_requests_are_invalid_argument() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    // Field 1 (repo, a string) holding bytes that are not UTF-8.
    let bad_utf8 = vec![0x0a, 0x03, 0xff, 0xfe, 0xfd];
    // A field with wire type 7 (there is none) and a truncated varint.
    let garbage = vec![0x0f, 0xff, 0xff, 0xff];
    for (what, body) in [("invalid UTF-8", bad_utf8), ("garbage", garbage)] {
        let s = raw_call(&api, "/kiln.v1.BuildService/SubmitBuild", body);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains("SubmitBuildRequest"), "{what}: {s:?}");
    }
    assert!(api.list_builds().is_empty());
    assert!(api.healthy());
}

#[test]
fn drain_runner_does_not_echo_a_long_name() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let mut c =
        proto::runner_admin_service_client::RunnerAdminServiceClient::new(api.channel.clone());
    let name = "x".repeat(8192);
    let s = api
        .rt
        .block_on(c.drain_runner(proto::DrainRunnerRequest { name }))
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().len() < 400, "{} bytes", s.message().len());
    assert!(s.message().contains("name"), "{}", s.message());
    let s = api
        .rt
        .block_on(c.drain_runner(proto::DrainRunnerRequest {
            name: "nobody".into(),
        }))
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
}

#[test]
fn a_repository_and_its_git_dir_are_one_repository() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: ok\n    run: echo ok\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let path = repo.path_str().to_string();
    let req = |repo: String| proto::SubmitBuildRequest {
        repo,
        commit: sha.clone(),
        branch: String::new(),
        trigger: "test".into(),
        env: Default::default(),
    };
    let first = api.submit(req(format!("{path}/.git"))).unwrap();
    assert_eq!(first.repo, path);
    for other in [path.clone(), format!("{path}/"), format!("{path}/./.git/")] {
        let s = api.submit(req(other.clone())).unwrap_err();
        assert_eq!(s.code(), Code::AlreadyExists, "{other}: {s:?}");
    }
    assert_eq!(api.list_builds().len(), 1);
}

#[test]
fn a_plaintext_client_on_a_tls_port_is_told_to_use_https() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let args = [
        "--server-cert",
        tls.server_cert.to_str().unwrap(),
        "--server-key",
        tls.server_key.to_str().unwrap(),
    ];
    let server = try_start_dispatcher("127.0.0.1:0", &tmp.path().join("data"), &args, "https")
        .unwrap_or_else(|out| panic!("the TLS dispatcher did not start: {out}"));
    let plain = format!("http://{}", server.addr);
    // The failure shows as "transport error", "h2 protocol error" or "operation was canceled"
    // depending on timing: each gets the hint and the "unavailable" exit code.
    for _ in 0..3 {
        for args in [
            &["builds"][..],
            &["show", "1"],
            &["runners"],
            &["logs", "1"],
        ] {
            let out = cli_at(&plain, &[], args);
            assert_eq!(out.status.code(), Some(6), "{args:?}: {out}");
            assert!(out.err().contains("https://"), "{args:?}: {out}");
        }
    }
}

/// An address that takes connections and never answers (a frozen dispatcher's host accepts
/// them in its kernel; so does a port that is not a gRPC server): each call ends at its
/// `--timeout` with exit code 6 and says so, instead of waiting for the connection's keepalive
/// (half a minute) or, for a request lost as its connection fails, forever.
#[test]
fn a_call_nobody_answers_ends_at_its_timeout() {
    // Never accepted: the kernel completes the handshakes and buffers what the client sends.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    for args in [
        &["builds"][..],
        &["show", "1"],
        &["runners"],
        &["logs", "1"],
        &["retry", "1"],
    ] {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--dispatcher", &url, "--timeout", "1s"]);
        // Well under the keepalive's 30 s: only the call's own deadline ends it this soon.
        let out = Proc::kiln(format!("kiln {args:?}"), &all).wait(Duration::from_secs(15));
        assert_eq!(out.status.code(), Some(6), "{args:?}: {out}");
        assert!(
            out.err().contains("no answer from the dispatcher in time"),
            "{args:?}: {out}"
        );
    }
    let mut cmd = std::process::Command::new(kiln_bin());
    cmd.args(["builds", "--dispatcher", &url])
        .env("KILN_TIMEOUT", "500ms");
    let out = Proc::spawn("kiln builds (KILN_TIMEOUT)", cmd).wait(Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(6), "{out}");
    for bad in ["0s", "2d", "soon"] {
        let out = kiln(&["builds", "--dispatcher", &url, "--timeout", bad]);
        assert_eq!(out.status.code(), Some(2), "--timeout {bad}: {out}");
        assert!(out.err().contains("--timeout"), "--timeout {bad}: {out}");
    }
    drop(silent);
}

/// A dispatcher whose data directory is a tmpfs of `size`, a repository whose one step runs
/// `before`, echoes `started`, waits (at most 2 minutes) for the file `go` in `tmp`, then runs
/// `then`, and runner `r1` running that commit's build. `None` where a tmpfs cannot be mounted.
struct FullDiskFarm {
    server: Server,
    repo: Repo,
    build: u64,
    go: std::path::PathBuf,
    r1: Proc,
    // Dropped last: the processes above go first, then the mount.
    disk: Tmpfs,
}

impl FullDiskFarm {
    fn start(tmp: &std::path::Path, size: &str, before: &str, then: &str) -> Option<FullDiskFarm> {
        let data = tmp.join("data");
        let Some(disk) = Tmpfs::mount(&data, size) else {
            eprintln!("skipping: cannot mount a tmpfs here (not root?)");
            return None;
        };
        let go = tmp.join("go");
        let pipeline = format!(
            "steps:\n  - name: step\n    run: |\n      {before}\n      echo started\n      for i in $(seq 1 2400); do [ -e {go} ] && break; sleep 0.05; done\n      {then}\n      echo finished\n",
            go = go.display(),
        );
        let (repo, first) = Repo::with_pipeline(&tmp.join("repo"), &pipeline);
        let server = Server::start(
            &data,
            &["--heartbeat-interval", "300ms", "--min-free-space", "1MiB"],
        );
        let r1 = server.runner(tmp, "r1", &[]);
        server.wait_runners_attached(&["r1"]);
        let build = id_of(&server.submit(&repo.path, &first));
        wait_for("the step to start", LONG, || {
            let out = server.cli(&["logs", &build.to_string()]);
            out.out()
                .contains("\nstarted\n")
                .then_some(())
                .ok_or(out.out())
        });
        Some(FullDiskFarm {
            server,
            repo,
            build,
            go,
            r1,
            disk,
        })
    }
}

/// The dispatcher's disk fills up while a job writes 8 MB of output: submits are refused with
/// RESOURCE_EXHAUSTED (exit 6) naming the cause, the job pauses (its runner keeps the output;
/// `kiln show` says why) and is neither requeued nor ended while its runner heartbeats; once
/// space is freed it resumes by itself and passes on its first attempt with its output stored
/// exactly once, and submits are accepted again.
#[test]
fn a_full_disk_pauses_jobs_refuses_submits_and_recovers() {
    let tmp = tempdir();
    // Steps left behind by a failing test are killed.
    let _reaper = MarkerReaper(tmp.path().display().to_string());
    let expected = tmp.path().join("expected");
    let then = format!(
        "head -c 6000000 /dev/urandom | base64 | tee {}",
        expected.display()
    );
    let Some(farm) = FullDiskFarm::start(tmp.path(), "24m", ":", &then) else {
        return;
    };
    let (server, repo, id, go) = (&farm.server, &farm.repo, farm.build, &farm.go);
    let second = repo.new_commit("second");

    let filler = farm.disk.fill();
    let api = Api::connect(&server.url);
    let refused = api
        .submit(proto::SubmitBuildRequest {
            repo: repo.path_str().to_string(),
            commit: second.clone(),
            branch: String::new(),
            trigger: "test".into(),
            env: Default::default(),
        })
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("disk is full"), "{refused:?}");
    let cli = server.cli(&["submit", "--repo", repo.path_str(), "--commit", &second]);
    assert_eq!(cli.code(), 6, "{cli}");
    assert!(cli.err().contains("disk is full"), "{cli}");

    // The output cannot be stored: the job pauses and says why.
    std::fs::write(go, b"").unwrap();
    server.wait_build(id, "the job to pause", LONG, |b| {
        job0(b)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("paused: the dispatcher's disk is full"))
    });
    // Several leases pass (the window in which a requeue or an end would happen): the runner
    // heartbeats, so the job stays on its first attempt, running.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let b = server.show(id);
    assert_eq!(b["state"], "running", "{b:#}");
    assert_eq!(job0(&b)["attempts"], 1, "{b:#}");

    std::fs::remove_file(&filler).unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b:#}");
    assert_eq!(job0(&b)["attempts"], 1, "{b:#}");
    assert_eq!(job0(&b)["message"].as_str().unwrap_or(""), "", "{b:#}");
    let want = std::fs::read_to_string(&expected).unwrap();
    assert!(want.len() > 7_000_000, "{}", want.len());
    let log = server.cli(&["logs", &id.to_string()]).expect_code(0).out();
    // The step's output exactly once, whole and in order (besides kiln's own system lines).
    assert_eq!(
        log.matches(want.as_str()).count(),
        1,
        "{} bytes of log",
        log.len()
    );
    assert!(log.contains(&format!("started\n{want}finished\n")));
    assert_eq!(log.matches("\nstarted\n").count(), 1);
    // New work is accepted again.
    let again = id_of(&server.submit(&repo.path, &second));
    assert_eq!(server.wait_final(again, LONG)["state"], "passed");
}

/// A runner dies while the dispatcher's disk is full: its job cannot be requeued then (that
/// is a write), and must not be lost from memory while the store still says it runs. Once
/// space is freed the job goes back to the queue by itself and passes on another runner.
#[test]
fn a_job_lost_while_the_disk_is_full_runs_again_once_space_is_back() {
    let tmp = tempdir();
    let _reaper = MarkerReaper(tmp.path().display().to_string());
    let Some(mut farm) = FullDiskFarm::start(tmp.path(), "16m", ":", ":") else {
        return;
    };
    let (server, id) = (&farm.server, farm.build);
    // A runner new to the dispatcher needs a row: it attaches before the disk fills.
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r2"]);
    let filler = farm.disk.fill();
    farm.r1.signal(Signal::SIGKILL);
    farm.r1.wait(LONG);
    // The lost runner's grace and lease pass many times over while the disk is full.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let b = server.show(id);
    assert_eq!(b["state"], "running", "{b:#}");
    std::fs::write(&farm.go, b"").unwrap();
    std::fs::remove_file(&filler).unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b:#}");
    assert_eq!(job0(&b)["runner"], "r2", "{b:#}");
    assert_eq!(job0(&b)["attempts"], 2, "{b:#}");
}

/// The case: a runner was lost after its attempt wrote 6 MB, the job runs again and
/// the disk fills up. The dispatcher drops the superseded attempt's output from the log (a hole
/// punched in the file; the log says what was dropped), which frees enough space for the job
/// to go on by itself: nobody frees space by hand.
#[test]
fn a_full_disk_drops_a_superseded_attempts_output_and_goes_on() {
    let tmp = tempdir();
    let _reaper = MarkerReaper(tmp.path().display().to_string());
    let before = "head -c 4500000 /dev/urandom | base64";
    let Some(mut farm) = FullDiskFarm::start(tmp.path(), "16m", before, ":") else {
        return;
    };
    let (server, id) = (&farm.server, farm.build);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r2"]);
    farm.r1.signal(Signal::SIGKILL);
    farm.r1.wait(LONG);
    server.wait_build(id, "the second attempt", LONG, |b| job0(b)["attempts"] == 2);
    wait_for("the second attempt's step to start", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]);
        out.out()
            .contains("\nstarted\n")
            .then_some(())
            .ok_or(out.err())
    });
    let _filler = farm.disk.fill();
    std::fs::write(&farm.go, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b:#}");
    assert_eq!(job0(&b)["attempts"], 2, "{b:#}");
    let log = server.cli(&["logs", &id.to_string()]).expect_code(0).out();
    assert!(
        log.contains("\nstarted\nfinished\n"),
        "{:?}",
        &log[log.len().saturating_sub(300)..]
    );
    let all = server
        .cli(&["logs", &id.to_string(), "--all-attempts"])
        .expect_code(0)
        .out();
    assert!(
        all.contains("bytes of output of attempt")
            && all.contains("were dropped to free disk space"),
        "{}",
        &all[..all.len().min(2000)]
    );
}
