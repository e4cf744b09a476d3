//! The dispatcher's edges against a real `kiln serve`: undecodable requests, oversized runner
//! names, two spellings of one repository, a plaintext client on a TLS port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fault_support;

use common::*;
use fault_support::*;
use kiln::proto;
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
