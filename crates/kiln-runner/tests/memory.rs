//! The runner driven through an in-memory transport, the test playing the dispatcher: the
//! handshake, an assignment, output and its acknowledgements, a broken stream, the re-attach
//! that sends again exactly what was not acknowledged, the result's acknowledgement, a drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_domain::protocol::{
    self, AssignedStep, DispatcherMessage, OutputStream, RunnerMessage, StreamError,
};
use kiln_domain::{AttemptId, BuildId, JobId, JobState, RunnerId, StepOutcome};
use kiln_runner::{ConnectError, Inbound, RunnerConfig, Transport};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// One stream as the dispatcher side sees it: what the runner sends, and where to answer.
struct Stream {
    from_runner: mpsc::Receiver<RunnerMessage>,
    to_runner: mpsc::Sender<Result<DispatcherMessage, StreamError>>,
}

/// Each attach hands the test a new [`Stream`].
struct Memory {
    streams: mpsc::Sender<Stream>,
}

impl Transport for Memory {
    async fn attach(
        &self,
        outbound: mpsc::Receiver<RunnerMessage>,
    ) -> Result<Inbound, ConnectError> {
        let (tx, rx) = mpsc::channel(64);
        self.streams
            .send(Stream {
                from_runner: outbound,
                to_runner: tx,
            })
            .await
            .map_err(|_| ConnectError::Unreachable("the test is over".into()))?;
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

const WAIT: Duration = Duration::from_secs(60);

impl Stream {
    /// The runner's next message that is not a heartbeat.
    async fn next(&mut self) -> RunnerMessage {
        loop {
            let m = tokio::time::timeout(WAIT, self.from_runner.recv())
                .await
                .expect("no message from the runner within a minute")
                .expect("the runner closed the stream");
            if !matches!(m, RunnerMessage::Heartbeat(_)) {
                return m;
            }
        }
    }

    async fn send(&self, m: DispatcherMessage) {
        self.to_runner.send(Ok(m)).await.unwrap();
    }

    async fn hello(&mut self) -> protocol::Hello {
        match self.next().await {
            RunnerMessage::Hello(h) => h,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    async fn welcome(&self, secret: &str) {
        self.send(DispatcherMessage::Welcome(protocol::Welcome {
            runner_id: RunnerId::new(1),
            heartbeat_interval_ms: 100,
            missed_heartbeats_allowed: 1000,
            stale_attempts: vec![],
            session_secret: secret.into(),
        }))
        .await;
    }

    /// Messages until the attempt's JobFinished (included).
    async fn until_finished(&mut self) -> Vec<RunnerMessage> {
        let mut got = Vec::new();
        loop {
            let m = self.next().await;
            let end = matches!(m, RunnerMessage::JobFinished(_));
            got.push(m);
            if end {
                return got;
            }
        }
    }
}

fn seqs(msgs: &[RunnerMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            RunnerMessage::Output(c) => Some(c.seq),
            _ => None,
        })
        .collect()
}

/// A repository with one commit; its path and the commit id.
fn repository(dir: &std::path::Path) -> (String, String) {
    let repo = git2::Repository::init(dir).unwrap();
    let blob = repo.blob(b"hello\n").unwrap();
    let mut tree = repo.treebuilder(None).unwrap();
    tree.insert("README", blob, 0o100644).unwrap();
    let tree = repo.find_tree(tree.write().unwrap()).unwrap();
    let sig = git2::Signature::now("Test", "test@example.com").unwrap();
    let commit = repo
        .commit(Some("refs/heads/main"), &sig, &sig, "one", &tree, &[])
        .unwrap();
    (dir.to_str().unwrap().to_string(), commit.to_string())
}

#[tokio::test]
async fn a_runner_over_memory_streams_resends_what_was_not_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, commit) = repository(&tmp.path().join("repo"));
    let mut config = RunnerConfig::new("mem-runner");
    config.work_dir = tmp.path().join("work");
    let (streams_tx, mut streams) = mpsc::channel(4);
    let (drain, stop) = (CancellationToken::new(), CancellationToken::new());
    let runner = tokio::spawn(kiln_runner::run(
        config,
        Memory {
            streams: streams_tx,
        },
        drain.clone(),
        stop.clone(),
    ));

    // The handshake.
    let mut s = streams.recv().await.unwrap();
    let hello = s.hello().await;
    assert_eq!(hello.name, "mem-runner");
    assert!(hello.held_attempts.is_empty());
    assert!(hello.session_secret.is_empty());
    s.welcome("secret-1").await;

    // An assignment: accepted, then its output, its step's end, the job's end.
    s.send(DispatcherMessage::Assign(protocol::Assign {
        attempt_id: AttemptId::new(7),
        job_id: JobId::new(3),
        build_id: BuildId::new(1),
        repo_url: url,
        commit,
        branch: "main".into(),
        steps: vec![AssignedStep {
            index: 0,
            name: "greet".into(),
            run: "echo one; echo two >&2; echo three".into(),
            env: BTreeMap::new(),
            timeout_ms: 60_000,
            post: None,
            split: None,
            junit: vec![],
        }],
        env: BTreeMap::new(),
        trace_context: BTreeMap::new(),
        attempt_number: 1,
        secrets: BTreeMap::new(),
    }))
    .await;
    let first = s.until_finished().await;
    assert!(
        matches!(
            first[0],
            RunnerMessage::Accepted(protocol::Accepted { attempt_id })
                if attempt_id == AttemptId::new(7)
        ),
        "{first:?}"
    );
    let sent = seqs(&first);
    assert_eq!(
        sent,
        (1..=sent.len() as u64).collect::<Vec<_>>(),
        "in order"
    );
    assert!(sent.len() >= 2, "{first:?}");
    let output: Vec<u8> = first
        .iter()
        .filter_map(|m| match m {
            RunnerMessage::Output(c) if c.stream != OutputStream::System => Some(c.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    let text = String::from_utf8(output).unwrap();
    for word in ["one", "two", "three"] {
        assert!(text.contains(word), "{text:?}");
    }
    let Some(RunnerMessage::JobFinished(done)) = first.last().cloned() else {
        unreachable!()
    };
    assert_eq!(done.state, JobState::Passed);
    assert_eq!(done.last_seq, *sent.last().unwrap());
    assert!(first.iter().any(|m| matches!(
        m,
        RunnerMessage::StepFinished(f) if f.outcome == StepOutcome::Passed && f.exit_code == Some(0)
    )));

    // Only the first chunk is acknowledged, then the stream breaks.
    s.send(DispatcherMessage::OutputAck(protocol::OutputAck {
        attempt_id: AttemptId::new(7),
        up_to_seq: 1,
    }))
    .await;
    s.to_runner
        .send(Err(StreamError::Unavailable {
            message: "the dispatcher went away".into(),
        }))
        .await
        .unwrap();
    drop(s);

    // The runner comes back holding the attempt, proves who it is, and sends again everything
    // not acknowledged, in order: chunk 1 is not among it.
    let mut s = streams.recv().await.unwrap();
    let hello = s.hello().await;
    assert_eq!(hello.held_attempts, vec![AttemptId::new(7)]);
    assert_eq!(hello.session_secret, "secret-1");
    s.welcome("secret-2").await;
    let again = s.until_finished().await;
    assert!(matches!(again[0], RunnerMessage::Accepted(_)), "{again:?}");
    assert_eq!(seqs(&again), sent[1..].to_vec());
    assert_eq!(again.last(), first.last());

    // Everything acknowledged: the runner holds nothing any more, and a drain ends it.
    s.send(DispatcherMessage::OutputAck(protocol::OutputAck {
        attempt_id: AttemptId::new(7),
        up_to_seq: done.last_seq,
    }))
    .await;
    s.send(DispatcherMessage::ResultAck(protocol::ResultAck {
        attempt_id: AttemptId::new(7),
    }))
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = tokio::time::timeout_at(deadline, s.from_runner.recv())
            .await
            .expect("the runner never reported holding nothing")
            .expect("stream closed");
        if let RunnerMessage::Heartbeat(h) = m
            && h.lists_held
            && h.running_attempts.is_empty()
        {
            break;
        }
    }
    drain.cancel();
    tokio::time::timeout(WAIT, runner)
        .await
        .expect("the drained runner did not stop")
        .unwrap()
        .unwrap();
}
