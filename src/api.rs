//! The gRPC edge of the dispatcher: thin tonic services over [`Dispatcher`], the one mapping of
//! engine errors to `tonic::Status`, and [`serve`], which puts everything (with health and
//! reflection) on one listener.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use kiln_domain::{BuildId, JobId};
use kiln_store::BuildFilter;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::ApiAuth;
use crate::convert;
use crate::proto::{
    self, build_service_server::BuildService, build_service_server::BuildServiceServer,
    runner_admin_service_server::RunnerAdminService,
    runner_admin_service_server::RunnerAdminServiceServer, runner_service_server::RunnerService,
    runner_service_server::RunnerServiceServer,
};
use kiln_dispatcher::{DispatchError, Dispatcher};

/// Largest request a client may send to `BuildService` and `RunnerAdminService`.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest message a runner may send on its stream (output chunks are at most 64 KiB).
pub const MAX_RUNNER_MESSAGE_BYTES: usize = kiln_domain::protocol::MAX_MESSAGE_BYTES;
/// Payload read from the log store per step of a follower.
const FOLLOW_READ_BYTES: usize = 1 << 20;

/// The one mapping of engine errors to gRPC statuses.
pub fn status(e: DispatchError) -> Status {
    let message = e.to_string();
    match e {
        DispatchError::InvalidArgument { .. } => Status::invalid_argument(message),
        DispatchError::NotFound(_) => Status::not_found(message),
        DispatchError::FailedPrecondition { .. } => Status::failed_precondition(message),
        DispatchError::AlreadyBuilt { .. } | DispatchError::RunnerAttached { .. } => {
            Status::already_exists(message)
        }
        DispatchError::Unavailable { .. } => Status::unavailable(message),
        DispatchError::ResourceExhausted { .. } => Status::resource_exhausted(message),
        DispatchError::Unauthenticated { .. } => Status::unauthenticated(message),
        DispatchError::PermissionDenied { .. } => Status::permission_denied(message),
        DispatchError::HelloTimeout { .. } => Status::deadline_exceeded(message),
        DispatchError::OutputGap { .. } | DispatchError::OutputMissing { .. } => {
            Status::data_loss(message)
        }
        DispatchError::Internal(cause) => {
            tracing::error!(cause = %cause, "internal error");
            Status::internal("internal error (see the dispatcher's log)")
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `RunnerService` over the engine.
#[derive(Debug, Clone)]
pub struct RunnerApi {
    dispatcher: Dispatcher,
    require_cert: bool,
}

#[tonic::async_trait]
impl RunnerService for RunnerApi {
    type AttachStream = BoxStream<proto::DispatcherMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<proto::RunnerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        if self.require_cert && leaf.is_none() {
            return Err(Status::unauthenticated(
                "runners must present a client certificate (mutual TLS)",
            ));
        }
        // A certificate names the runner: it may attach only under one of its names.
        let names = leaf
            .map(|cert| crate::tls::certificate_names(cert.as_ref()))
            .transpose()
            .map_err(Status::unauthenticated)?;
        // The session speaks domain messages: wire messages become them here (one that does
        // not fit ends the session with INVALID_ARGUMENT), and its answers become wire ones.
        let inbound = request.into_inner().map(|m| match m {
            Ok(m) => convert::runner_message_from_proto(m)
                .map_err(|message| kiln_domain::protocol::StreamError::InvalidArgument { message }),
            Err(status) => Err(convert::stream_error_from_status(&status)),
        });
        let outbound = self
            .dispatcher
            .attach_named(Box::pin(inbound), names)
            .map(|m| m.map(convert::dispatcher_message_to_proto).map_err(status));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// `BuildService` over the engine.
#[derive(Debug, Clone)]
pub struct BuildApi {
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    auth: ApiAuth,
}

#[tonic::async_trait]
impl BuildService for BuildApi {
    async fn get_test_report(
        &self,
        request: Request<proto::GetTestReportRequest>,
    ) -> Result<Response<proto::TestReport>, Status> {
        self.auth.check_read(request.metadata())?;
        let build = request.into_inner().build_id;
        let r = self
            .dispatcher
            .test_report(BuildId::new(build))
            .await
            .map_err(status)?;
        Ok(Response::new(proto::TestReport {
            build_id: build,
            splits: r
                .splits
                .iter()
                .map(convert::split_report_to_proto)
                .collect(),
            steps: r.steps.iter().map(convert::step_report_to_proto).collect(),
            junit_xml: r.junit_xml().unwrap_or_default(),
        }))
    }

    async fn submit_build(
        &self,
        request: Request<proto::SubmitBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        self.auth.check_write(request.metadata())?;
        let r = request.into_inner();
        let d = self
            .dispatcher
            .submit(convert::submit_from_proto(r))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::build_to_proto(&d)))
    }

    async fn get_build(
        &self,
        request: Request<proto::GetBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        self.auth.check_read(request.metadata())?;
        let d = self
            .dispatcher
            .get_build(BuildId::new(request.into_inner().build_id))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::build_to_proto(&d)))
    }

    async fn list_builds(
        &self,
        request: Request<proto::ListBuildsRequest>,
    ) -> Result<Response<proto::ListBuildsResponse>, Status> {
        self.auth.check_read(request.metadata())?;
        let r = request.into_inner();
        let limit = match r.page_size {
            0 => 50,
            n if n > 500 => {
                return Err(Status::invalid_argument("page_size must be at most 500"));
            }
            n => n,
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<u64>().map_err(|_| {
                Status::invalid_argument("page_token is not a token from a previous response")
            })?)
        };
        let state = match r.state {
            0 => None,
            n => Some(
                proto::JobState::try_from(n)
                    .ok()
                    .and_then(convert::job_state_from_proto)
                    .ok_or_else(|| Status::invalid_argument(format!("state {n} is not a state")))?,
            ),
        };
        let filter = BuildFilter {
            repo: (!r.repo.is_empty()).then_some(r.repo),
            branch: (!r.branch.is_empty()).then_some(r.branch),
            state,
            before: before.map(BuildId::new),
            limit: limit + 1,
        };
        let mut builds = self.dispatcher.list_builds(filter).await.map_err(status)?;
        let next_page_token = if builds.len() > limit as usize {
            builds.truncate(limit as usize);
            builds.last().map(|b| b.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListBuildsResponse {
            builds: builds.iter().map(convert::build_summary_to_proto).collect(),
            next_page_token,
        }))
    }

    type StreamLogsStream = BoxStream<proto::LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<proto::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.auth.check_read(request.metadata())?;
        let r = request.into_inner();
        let d = &self.dispatcher;
        let job: JobId = match (r.job_id, r.build_id) {
            (0, 0) => return Err(Status::invalid_argument("job_id or build_id is required")),
            (0, b) => {
                let detail = d.get_build(BuildId::new(b)).await.map_err(status)?;
                match detail.jobs.first() {
                    Some(j) => j.id,
                    None => {
                        return Err(Status::failed_precondition(format!(
                            "build {b} has no jobs: {}",
                            detail.build.error.unwrap_or_default()
                        )));
                    }
                }
            }
            (j, _) => JobId::new(j),
        };
        // Subscribe first, then look at the job: an end in between cannot be missed.
        let mut progress = d.follow(job).await.map_err(status)?;
        let state = d.get_job(job).await.map_err(status)?.state;
        d.settle_follow(job, state).await;
        if r.offset > progress.borrow().len {
            return Err(Status::invalid_argument(format!(
                "offset {} is past the end of job {job}'s log ({} bytes)",
                r.offset,
                progress.borrow().len
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        let d = d.clone();
        let shutdown = self.shutdown.clone();
        let follow = r.follow;
        let mut offset = r.offset;
        tokio::spawn(async move {
            loop {
                let p = *progress.borrow_and_update();
                if offset < p.len {
                    match d.read_log(job, offset, p.len, FOLLOW_READ_BYTES).await {
                        Ok(read) => {
                            for f in read.frames {
                                let chunk = proto::LogChunk {
                                    step_index: f.header.step,
                                    stream: i32::from(f.header.stream),
                                    data: f.data.into(),
                                    next_offset: f.next_offset,
                                    final_state: 0,
                                    attempt_id: f.header.attempt.get(),
                                };
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                            offset = read.next_offset;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(status(e))).await;
                            return;
                        }
                    }
                    continue;
                }
                let end = match p.done {
                    Some(s) => Some(s),
                    None if !follow => Some(state).filter(|s| s.is_final()),
                    None => None,
                };
                if end.is_some() || !follow {
                    let _ = tx
                        .send(Ok(proto::LogChunk {
                            step_index: 0,
                            stream: 0,
                            data: Default::default(),
                            next_offset: offset,
                            final_state: end.map_or(0, |s| convert::job_state_to_proto(s) as i32),
                            attempt_id: 0,
                        }))
                        .await;
                    return;
                }
                tokio::select! {
                    changed = progress.changed() => {
                        if changed.is_err() && progress.borrow().done.is_none() {
                            // The channel was replaced; subscribe again.
                            match d.follow(job).await {
                                Ok(p) => progress = p,
                                Err(e) => { let _ = tx.send(Err(status(e))).await; return; }
                            }
                            if let Ok(j) = d.get_job(job).await {
                                d.settle_follow(job, j.state).await;
                            }
                        }
                    }
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the dispatcher is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchBuildsStream = BoxStream<proto::BuildEvent>;

    async fn watch_builds(
        &self,
        request: Request<proto::WatchBuildsRequest>,
    ) -> Result<Response<Self::WatchBuildsStream>, Status> {
        self.auth.check_read(request.metadata())?;
        let only = request.into_inner().build_id;
        let mut events = self.dispatcher.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                };
                match ev {
                    Ok(ev) if only == 0 || ev.build_id == BuildId::new(only) => {
                        let out = proto::BuildEvent {
                            build_id: ev.build_id.get(),
                            job_id: ev.job_id.map_or(0, u64::from),
                            state: convert::job_state_to_proto(ev.state) as i32,
                            at: Some(convert::timestamp(ev.at)),
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell behind and missed {n} events; watch again and re-read the builds"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_build(
        &self,
        request: Request<proto::CancelBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        self.auth.check_write(request.metadata())?;
        let d = self
            .dispatcher
            .cancel_build(BuildId::new(request.into_inner().build_id))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::build_to_proto(&d)))
    }

    async fn report_commits(
        &self,
        request: Request<proto::ReportCommitsRequest>,
    ) -> Result<Response<proto::ReportCommitsResponse>, Status> {
        self.auth.check_write(request.metadata())?;
        let r = request.into_inner();
        let trigger = if r.trigger.is_empty() {
            "observer".to_string()
        } else {
            r.trigger
        };
        let builds = self
            .dispatcher
            .report_commits(&r.repo, &r.branch, &r.commits, &trigger)
            .await
            .map_err(status)?;
        let cursor = self
            .dispatcher
            .branch_cursor(r.repo.trim(), &r.branch)
            .await
            .map_err(status)?
            .unwrap_or_default();
        Ok(Response::new(proto::ReportCommitsResponse {
            builds: builds.iter().map(convert::build_to_proto).collect(),
            cursor,
        }))
    }

    async fn get_branch_cursor(
        &self,
        request: Request<proto::GetBranchCursorRequest>,
    ) -> Result<Response<proto::BranchCursor>, Status> {
        self.auth.check_read(request.metadata())?;
        let r = request.into_inner();
        if r.repo.trim().is_empty() || r.branch.is_empty() {
            return Err(Status::invalid_argument("repo and branch are required"));
        }
        let head = self
            .dispatcher
            .branch_cursor(r.repo.trim(), &r.branch)
            .await
            .map_err(status)?
            .unwrap_or_default();
        Ok(Response::new(proto::BranchCursor { head }))
    }

    async fn retry_build(
        &self,
        request: Request<proto::RetryBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        self.auth.check_write(request.metadata())?;
        let d = self
            .dispatcher
            .retry_build(BuildId::new(request.into_inner().build_id))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::build_to_proto(&d)))
    }
}

/// `RunnerAdminService` over the engine.
#[derive(Debug, Clone)]
pub struct RunnerAdminApi {
    dispatcher: Dispatcher,
    auth: ApiAuth,
}

#[tonic::async_trait]
impl RunnerAdminService for RunnerAdminApi {
    async fn list_runners(
        &self,
        request: Request<proto::ListRunnersRequest>,
    ) -> Result<Response<proto::ListRunnersResponse>, Status> {
        self.auth.check_read(request.metadata())?;
        let runners = self.dispatcher.list_runners().await.map_err(status)?;
        Ok(Response::new(proto::ListRunnersResponse {
            runners: runners
                .into_iter()
                .map(|r| {
                    convert::runner_to_proto(&r.record, r.state, r.running_jobs, r.last_heartbeat)
                })
                .collect(),
        }))
    }

    async fn drain_runner(
        &self,
        request: Request<proto::DrainRunnerRequest>,
    ) -> Result<Response<proto::Runner>, Status> {
        self.auth.check_write(request.metadata())?;
        let r = self
            .dispatcher
            .drain_runner(&request.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::runner_to_proto(
            &r.record,
            kiln_dispatcher::RunnerState::Draining,
            r.running_jobs,
            r.last_heartbeat,
        )))
    }

    async fn get_queue(
        &self,
        request: Request<proto::GetQueueRequest>,
    ) -> Result<Response<proto::Queue>, Status> {
        self.auth.check_read(request.metadata())?;
        let sets = self.dispatcher.queue().await.map_err(status)?;
        Ok(Response::new(convert::queue_to_proto(sets)))
    }
}

/// How the listener is secured.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// TLS for the listener (plaintext when `None`).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// API token rules.
    pub api_auth: ApiAuth,
    /// Runners must present a client certificate (needs `tls` with a client CA).
    pub require_runner_cert: bool,
    /// The signed push webhook (`POST /webhooks/push`), on this same listener.
    pub webhook: crate::webhook::WebhookConfig,
    /// The web reporter's authorisation (the same token and rule as `api_auth`).
    pub web_auth: kiln_web::WebAuth,
}

/// Serves the dispatcher on `listener` until `shutdown` resolves: every kiln service, the
/// standard health service and server reflection (v1 and v1alpha). On shutdown, health turns
/// NOT_SERVING, runner sessions and log followers are closed (runners reconnect to the next
/// dispatcher), the scheduler stops, and in-flight unary calls finish.
pub async fn serve(
    listener: TcpListener,
    dispatcher: Dispatcher,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BuildServiceServer<BuildApi>>()
        .await;
    health_reporter
        .set_serving::<RunnerServiceServer<RunnerApi>>()
        .await;
    health_reporter
        .set_serving::<RunnerAdminServiceServer<RunnerAdminApi>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let ServeOptions {
        tls,
        api_auth,
        require_runner_cert,
        webhook,
        web_auth,
    } = options;
    let (reflection_v1, reflection_v1alpha) = match (reflection_v1, reflection_v1alpha) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            // The descriptor set is compiled into the binary; this cannot fail at run time
            // unless the build is broken.
            tracing::error!(cause = %e, "reflection unavailable");
            return Ok(());
        }
    };

    let stop = CancellationToken::new();
    let background = dispatcher.spawn_background(stop.clone());
    let build_api = BuildApi {
        dispatcher: dispatcher.clone(),
        shutdown: stop.clone(),
        auth: api_auth.clone(),
    };
    let graceful = {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: closing runner sessions and followers");
            health_reporter
                .set_not_serving::<BuildServiceServer<BuildApi>>()
                .await;
            health_reporter
                .set_not_serving::<RunnerServiceServer<RunnerApi>>()
                .await;
            stop.cancel();
            dispatcher.close_sessions();
        }
    };
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, data_dir = %dispatcher.config().data_dir.display(), "dispatcher listening");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            // Live output: never wait for Nagle.
            let _ = s.set_nodelay(true);
        }
        s
    });
    let result = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // HTTP/1.1 too, for the push webhook and downloads (gRPC stays HTTP/2).
        .accept_http1(true)
        .add_routes(crate::webhook::routes(
            dispatcher.clone(),
            webhook,
            crate::downloads::router(dispatcher.clone(), api_auth.clone()).merge(
                kiln_web::router_with_shutdown(dispatcher.clone(), web_auth, stop.clone()),
            ),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RunnerServiceServer::new(RunnerApi {
                dispatcher: dispatcher.clone(),
                require_cert: require_runner_cert,
            })
            .max_decoding_message_size(MAX_RUNNER_MESSAGE_BYTES),
        )
        .add_service(
            BuildServiceServer::new(build_api).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            RunnerAdminServiceServer::new(RunnerAdminApi {
                dispatcher: dispatcher.clone(),
                auth: api_auth,
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, graceful)
        .await;
    stop.cancel();
    let _ = background.await;
    dispatcher.sync_logs();
    result
}
