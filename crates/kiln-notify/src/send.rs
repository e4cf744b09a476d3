//! Sending one delivery: a webhook POST, a mail, a commit status. The target's settings and
//! secrets come from the config by the delivery's target name (never from the store).

use std::time::Duration;

use kiln_store::Delivery;
use lettre::AsyncTransport;
use serde::Deserialize;

use crate::config::{Config, Forge, Security, split_owner_repo};
use crate::plan::target_kind;
use crate::rules::signature;

/// Why a try failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Worth another try (unreachable, timed out, 5xx, 429).
    Transient(String),
    /// Another try would fail the same (4xx, no longer configured, bad payload).
    Permanent(String),
}

/// What a webhook or status endpoint answered.
fn classify(status: reqwest::StatusCode) -> Result<(), SendError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        Err(SendError::Transient(format!("answered {status}")))
    } else {
        Err(SendError::Permanent(format!("answered {status}")))
    }
}

fn http_error(e: reqwest::Error) -> SendError {
    SendError::Transient(kiln_domain::error_chain(&e))
}

/// Sends one delivery.
pub(crate) async fn send(
    client: &reqwest::Client,
    config: &Config,
    d: &Delivery,
) -> Result<(), SendError> {
    match target_kind(&d.target) {
        "webhook" => webhook(client, config, d).await,
        "mail" => mail(config, d).await,
        "status" => status(client, config, d).await,
        other => Err(SendError::Permanent(format!(
            "unknown target kind {other:?}"
        ))),
    }
}

async fn webhook(client: &reqwest::Client, config: &Config, d: &Delivery) -> Result<(), SendError> {
    let url = d.target.strip_prefix("webhook ").unwrap_or_default();
    let Some(hook) = config
        .rules
        .iter()
        .filter_map(|r| r.webhook.as_ref())
        .find(|w| w.url == url)
    else {
        return Err(SendError::Permanent(
            "the webhook is no longer configured".into(),
        ));
    };
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .header("x-kiln-event", &d.event)
        .header("x-kiln-delivery", &d.delivery_id);
    if let Some(secret) = &hook.secret {
        req = req.header(
            "x-kiln-signature-256",
            signature(secret, d.payload.as_bytes()),
        );
    }
    let answer = req
        .body(d.payload.clone())
        .send()
        .await
        .map_err(http_error)?;
    classify(answer.status())
}

#[derive(Deserialize)]
struct StatusPayload {
    sha: String,
    state: String,
    description: String,
    target_url: Option<String>,
    context: String,
}

async fn status(client: &reqwest::Client, config: &Config, d: &Delivery) -> Result<(), SendError> {
    let mut parts = d.target.splitn(4, ' ').skip(1);
    let (Some(forge), Some(api), Some(repo)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SendError::Permanent(format!("bad target {:?}", d.target)));
    };
    let Some((owner, name)) = split_owner_repo(repo) else {
        return Err(SendError::Permanent(format!("bad repository {repo:?}")));
    };
    let Some(s) = config
        .rules
        .iter()
        .filter_map(|r| r.status.as_ref())
        .find(|s| {
            s.forge.as_str() == forge && s.api == api && s.repo.as_deref().is_none_or(|r| r == repo)
        })
    else {
        return Err(SendError::Permanent(
            "the commit status is no longer configured".into(),
        ));
    };
    let p: StatusPayload = serde_json::from_str(&d.payload)
        .map_err(|e| SendError::Permanent(format!("bad payload: {e}")))?;
    let (url, auth) = match s.forge {
        Forge::Github => (
            format!("{api}/repos/{owner}/{name}/statuses/{}", p.sha),
            format!("Bearer {}", s.token),
        ),
        Forge::Gitea => (
            format!("{api}/api/v1/repos/{owner}/{name}/statuses/{}", p.sha),
            format!("token {}", s.token),
        ),
    };
    let mut body = serde_json::json!({
        "state": p.state,
        "description": p.description,
        "context": p.context,
    });
    if let Some(t) = p.target_url {
        body["target_url"] = t.into();
    }
    let answer = client
        .post(url)
        .header("authorization", auth)
        .header("accept", "application/vnd.github+json")
        .header("user-agent", concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .json(&body)
        .send()
        .await
        .map_err(http_error)?;
    classify(answer.status())
}

#[derive(Deserialize)]
struct MailPayload {
    to: Vec<String>,
    subject: String,
    body: String,
}

async fn mail(config: &Config, d: &Delivery) -> Result<(), SendError> {
    let Some(smtp) = &config.smtp else {
        return Err(SendError::Permanent("no smtp server is configured".into()));
    };
    let p: MailPayload = serde_json::from_str(&d.payload)
        .map_err(|e| SendError::Permanent(format!("bad payload: {e}")))?;
    let mut message = lettre::Message::builder()
        .from(smtp.from.clone())
        .subject(p.subject)
        .message_id(Some(format!("<{}@kiln>", d.delivery_id)))
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    for to in &p.to {
        let mailbox = to
            .parse()
            .map_err(|e| SendError::Permanent(format!("bad recipient {to:?}: {e}")))?;
        message = message.to(mailbox);
    }
    let message = message
        .body(p.body)
        .map_err(|e| SendError::Permanent(format!("cannot build the mail: {e}")))?;
    let builder = match smtp.security {
        Security::Tls => lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::relay(&smtp.host),
        Security::Starttls => {
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::starttls_relay(&smtp.host)
        }
        Security::None => {
            Ok(lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(&smtp.host))
        }
    }
    .map_err(|e| SendError::Permanent(format!("smtp: {e}")))?;
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(config.delivery.timeout));
    if let (Some(pem), Security::Tls | Security::Starttls) = (&smtp.ca_pem, smtp.security) {
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        let params = Certificate::from_pem(pem)
            .and_then(|ca| {
                TlsParameters::builder(smtp.host.clone())
                    .add_root_certificate(ca)
                    .build()
            })
            .map_err(|e| SendError::Permanent(format!("smtp tls: {e}")))?;
        builder = builder.tls(match smtp.security {
            Security::Tls => Tls::Wrapper(params),
            _ => Tls::Required(params),
        });
    }
    if let Some((user, password)) = &smtp.credentials {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            password.clone(),
        ));
    }
    let transport = builder.build();
    match transport.send(message).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => Err(SendError::Permanent(kiln_domain::error_chain(&e))),
        Err(e) => Err(SendError::Transient(kiln_domain::error_chain(&e))),
    }
}

/// The HTTP client: rustls, a timeout on every request, no redirects to elsewhere.
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}
