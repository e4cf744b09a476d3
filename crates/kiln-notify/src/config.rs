//! The notification config file (`kiln serve --notify-config FILE`): plain derived structs
//! read with `serde_norway` (`deny_unknown_fields`), then one validation pass that compiles the
//! patterns, checks URLs and looks the named secrets up in the dispatcher's secrets file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_domain::branch::BranchPattern;
use serde::Deserialize;

/// An event a target can be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The build was accepted (commit statuses say `pending`).
    Queued,
    /// Its first job started running.
    Started,
    /// It reached a final state, whichever.
    Finished,
    /// It ended failed, timed out or errored.
    Failed,
    /// It passed, and the previous build of the same repository and branch that ended with a
    /// verdict did not.
    Fixed,
}

impl EventKind {
    /// The name in the config, payloads and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Started => "started",
            EventKind::Finished => "finished",
            EventKind::Failed => "failed",
            EventKind::Fixed => "fixed",
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption (a relay on the same host or network).
    None,
}

/// The forge API a commit status is posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forge {
    /// `POST {api}/repos/{owner}/{repo}/statuses/{sha}`, `Authorization: Bearer`.
    Github,
    /// `POST {api}/api/v1/repos/{owner}/{repo}/statuses/{sha}`, `Authorization: token`.
    Gitea,
}

impl Forge {
    /// The name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::Github => "github",
            Forge::Gitea => "gitea",
        }
    }
}

/// Reads a PEM file of CA certificates: at least one, each one a certificate lettre's TLS
/// takes.
fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    lettre::transport::smtp::client::Certificate::from_pem(&pem)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pem)
}

// ------------------------------------------------------------------------------------------
// The file as written.
// ------------------------------------------------------------------------------------------

/// The file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Base of build page links (`{public_url}/builds/{id}`).
    #[serde(default)]
    public_url: Option<String>,
    /// The mail server, needed by rules with `mail`.
    #[serde(default)]
    smtp: Option<SmtpFile>,
    /// Retries, timeouts and concurrency of deliveries.
    #[serde(default)]
    delivery: DeliveryFile,
    /// Who is told what, per repository and branch.
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SmtpFile {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    security: Security,
    from: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_secret: Option<String>,
    /// PEM file of CA certificates trusted besides the public roots (a mail server with a
    /// certificate from a private CA); relative to the config file's directory.
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DeliveryFile {
    #[serde(with = "humantime_serde")]
    first_retry: Duration,
    #[serde(with = "humantime_serde")]
    max_retry: Duration,
    tries: u32,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    concurrency: usize,
}

impl Default for DeliveryFile {
    fn default() -> Self {
        let d = DeliverySettings::default();
        Self {
            first_retry: d.first_retry,
            max_retry: d.max_retry,
            tries: d.tries,
            timeout: d.timeout,
            concurrency: d.concurrency,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    repo: String,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    webhook: Option<WebhookFile>,
    #[serde(default)]
    mail: Option<MailFile>,
    #[serde(default)]
    status: Option<StatusFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    url: String,
    #[serde(default)]
    secret_secret: Option<String>,
    #[serde(default)]
    events: Option<Vec<EventKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailFile {
    to: Vec<String>,
    #[serde(default)]
    on: Option<Vec<EventKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusFile {
    forge: Forge,
    api: String,
    #[serde(default)]
    repo: Option<String>,
    token_secret: String,
}

// ------------------------------------------------------------------------------------------
// The checked config.
// ------------------------------------------------------------------------------------------

/// Retries, timeouts and concurrency of deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    /// Wait before the second try; doubled for each further one (plus up to a quarter of
    /// jitter).
    pub first_retry: Duration,
    /// Longest wait between two tries.
    pub max_retry: Duration,
    /// Tries before a delivery is recorded as failed.
    pub tries: u32,
    /// Limit of one request (connect, send, answer), or of one mail.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(5),
            max_retry: Duration::from_secs(15 * 60),
            tries: 10,
            timeout: Duration::from_secs(10),
            concurrency: 8,
        }
    }
}

/// The mail server.
#[derive(Debug, Clone)]
pub struct Smtp {
    /// Host name.
    pub host: String,
    /// Port (default: 587 with STARTTLS, 465 with TLS, 25 without).
    pub port: u16,
    /// How the connection is secured.
    pub security: Security,
    /// The sender (`name <address>`).
    pub from: lettre::message::Mailbox,
    /// User name and password (from the secrets file), when the server wants them.
    pub credentials: Option<(String, String)>,
    /// CA certificates (PEM) trusted besides the public roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// A webhook target.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Where to POST.
    pub url: String,
    /// HMAC key of `X-Kiln-Signature-256` (no signature without one).
    pub secret: Option<String>,
    /// What it is told about (default: started, finished, failed, fixed).
    pub events: Vec<EventKind>,
}

/// A mail target.
#[derive(Debug, Clone)]
pub struct Mail {
    /// Recipients.
    pub to: Vec<lettre::message::Mailbox>,
    /// What they are told about (default: failed, fixed).
    pub on: Vec<EventKind>,
}

/// A commit status target.
#[derive(Debug, Clone)]
pub struct Status {
    /// Which API.
    pub forge: Forge,
    /// Its base URL (`https://api.github.com`, `https://gitea.example.com`).
    pub api: String,
    /// `owner/repo` at the forge; derived from the build's repository URL when not given.
    pub repo: Option<String>,
    /// The API token (from the secrets file).
    pub token: String,
}

/// One rule: which builds, and whom to tell.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The repository glob as written.
    pub repo_text: String,
    /// The repository glob (`*` within a path segment, `**` across).
    pub repo: globset::GlobMatcher,
    /// Branches (any when not given).
    pub branch: Option<BranchPattern>,
    /// Webhook.
    pub webhook: Option<Webhook>,
    /// Mail.
    pub mail: Option<Mail>,
    /// Commit status.
    pub status: Option<Status>,
}

impl Rule {
    /// Whether a build of `repo` on `branch` is this rule's.
    pub fn matches(&self, repo: &str, branch: &str) -> bool {
        self.repo.is_match(repo) && self.branch.as_ref().is_none_or(|b| b.matches(branch))
    }
}

/// The checked notification config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Base of build page links, without a trailing slash.
    pub public_url: Option<String>,
    /// The mail server.
    pub smtp: Option<Smtp>,
    /// Retries, timeouts, concurrency.
    pub delivery: DeliverySettings,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

/// A config file that cannot be used: the message names the file and, where it can, the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and checks `path`; `*_secret` fields name entries of `secrets`.
    pub fn load(path: &Path, secrets: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("cannot read notify config {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_in(&text, &path.display().to_string(), secrets, base)
    }

    /// Checks the text of a config file named `name` (for messages).
    pub fn parse(
        text: &str,
        name: &str,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        Self::parse_in(text, name, secrets, Path::new("."))
    }

    /// [`Config::parse`], with relative file names (`smtp.ca_file`) read from `base`.
    pub fn parse_in(
        text: &str,
        name: &str,
        secrets: &BTreeMap<String, String>,
        base: &Path,
    ) -> Result<Self, ConfigError> {
        let file: File = serde_norway::from_str(text).map_err(|e| match e.location() {
            Some(l) => ConfigError(format!(
                "{name}:{}:{}: {}",
                l.line(),
                l.column(),
                strip_location(&e.to_string())
            )),
            None => ConfigError(format!("{name}: {e}")),
        })?;
        let err = |field: String, msg: String| ConfigError(format!("{name}: {field}: {msg}"));
        let secret = |field: String, key: &str| -> Result<String, ConfigError> {
            secrets.get(key).cloned().ok_or_else(|| {
                err(
                    field,
                    format!("no secret {key:?} in the secrets file (--secrets-file)"),
                )
            })
        };
        let public_url = match file.public_url {
            Some(u) => {
                check_url(&u).map_err(|m| err("public_url".into(), m))?;
                Some(u.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let smtp = match file.smtp {
            Some(s) => {
                let from = s
                    .from
                    .parse()
                    .map_err(|e| err("smtp.from".into(), format!("not a mailbox: {e}")))?;
                let credentials = match (s.username, s.password_secret) {
                    (Some(u), Some(p)) => Some((u, secret("smtp.password_secret".into(), &p)?)),
                    (None, None) => None,
                    _ => {
                        return Err(err(
                            "smtp".into(),
                            "username and password_secret go together".into(),
                        ));
                    }
                };
                let ca_pem = match s.ca_file {
                    Some(f) => {
                        Some(read_ca(&base.join(f)).map_err(|m| err("smtp.ca_file".into(), m))?)
                    }
                    None => None,
                };
                let port = s.port.unwrap_or(match s.security {
                    Security::Starttls => 587,
                    Security::Tls => 465,
                    Security::None => 25,
                });
                Some(Smtp {
                    host: s.host,
                    port,
                    security: s.security,
                    from,
                    credentials,
                    ca_pem,
                })
            }
            None => None,
        };
        let d = file.delivery;
        if d.tries == 0 || d.concurrency == 0 || d.timeout.is_zero() {
            return Err(err(
                "delivery".into(),
                "tries, concurrency and timeout must be more than 0".into(),
            ));
        }
        let delivery = DeliverySettings {
            first_retry: d.first_retry,
            max_retry: d.max_retry.max(d.first_retry),
            tries: d.tries,
            timeout: d.timeout,
            concurrency: d.concurrency,
        };
        let mut rules = Vec::new();
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            let repo = globset::GlobBuilder::new(&r.repo)
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    err(
                        at("repo"),
                        format!("{:?} is not a glob: {}", r.repo, e.kind()),
                    )
                })?
                .compile_matcher();
            let branch = match &r.branch {
                Some(b) => Some(
                    BranchPattern::new(b)
                        .map_err(|m| err(at("branch"), format!("branch pattern {b:?}: {m}")))?,
                ),
                None => None,
            };
            let webhook = match r.webhook {
                Some(w) => {
                    check_url(&w.url).map_err(|m| err(at("webhook.url"), m))?;
                    let secret = match &w.secret_secret {
                        Some(k) => Some(secret(at("webhook.secret_secret"), k)?),
                        None => None,
                    };
                    Some(Webhook {
                        url: w.url,
                        secret,
                        events: w.events.unwrap_or_else(|| {
                            vec![
                                EventKind::Started,
                                EventKind::Finished,
                                EventKind::Failed,
                                EventKind::Fixed,
                            ]
                        }),
                    })
                }
                None => None,
            };
            let mail = match r.mail {
                Some(m) => {
                    if smtp.is_none() {
                        return Err(err(at("mail"), "mail needs an `smtp:` server".into()));
                    }
                    if m.to.is_empty() {
                        return Err(err(at("mail.to"), "no recipient".into()));
                    }
                    let to =
                        m.to.iter()
                            .map(|t| {
                                t.parse().map_err(|e| {
                                    err(at("mail.to"), format!("{t:?} is not a mailbox: {e}"))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                    Some(Mail {
                        to,
                        on: m
                            .on
                            .unwrap_or_else(|| vec![EventKind::Failed, EventKind::Fixed]),
                    })
                }
                None => None,
            };
            let status = match r.status {
                Some(s) => {
                    check_url(&s.api).map_err(|m| err(at("status.api"), m))?;
                    if let Some(repo) = &s.repo
                        && split_owner_repo(repo).is_none()
                    {
                        return Err(err(
                            at("status.repo"),
                            format!("{repo:?} is not `owner/repo`"),
                        ));
                    }
                    Some(Status {
                        forge: s.forge,
                        api: s.api.trim_end_matches('/').to_owned(),
                        repo: s.repo,
                        token: secret(at("status.token_secret"), &s.token_secret)?,
                    })
                }
                None => None,
            };
            rules.push(Rule {
                repo_text: r.repo,
                repo,
                branch,
                webhook,
                mail,
                status,
            });
        }
        Ok(Config {
            public_url,
            smtp,
            delivery,
            rules,
        })
    }

    /// The link to a build's page, when `public_url` is set.
    pub fn build_url(&self, id: kiln_domain::BuildId) -> Option<String> {
        self.public_url.as_ref().map(|u| format!("{u}/builds/{id}"))
    }
}

/// serde_norway ends its messages with "at line L column C"; the location goes first here.
fn strip_location(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

fn check_url(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| format!("{u:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{u:?} is not an http(s) URL"));
    }
    Ok(())
}

/// `owner/repo` split in two (each part non-empty, no further `/`).
pub fn split_owner_repo(s: &str) -> Option<(&str, &str)> {
    let (o, r) = s.split_once('/')?;
    (!o.is_empty() && !r.is_empty() && !r.contains('/')).then_some((o, r))
}

/// The forge's `owner/repo` of a repository location: the last two path segments of a URL
/// (`https://github.com/acme/app.git`, `git@github.com:acme/app`), without `.git`.
pub fn derive_owner_repo(location: &str) -> Option<String> {
    let path = location.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let mut parts = path.rsplit(['/', ':']);
    let repo = parts.next().filter(|s| !s.is_empty())?;
    let owner = parts.next().filter(|s| !s.is_empty())?;
    Some(format!("{owner}/{repo}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The example of the README's "Notifications" section, as written there.
    fn readme_example() -> &'static str {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Notifications").unwrap()..];
        let block = &section[section.find("```yaml\n").unwrap() + 8..];
        &block[..block.find("```").unwrap()]
    }

    fn secrets() -> BTreeMap<String, String> {
        [
            ("SMTP_PASSWORD", "pw"),
            ("HOOK_SECRET", "hook"),
            ("GITHUB_TOKEN", "tok"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn the_example_parses() {
        let c = Config::parse(readme_example(), "notify.yml", &secrets()).unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://ci.example.com"));
        let smtp = c.smtp.as_ref().unwrap();
        assert_eq!((smtp.port, smtp.security), (587, Security::Starttls));
        assert_eq!(smtp.credentials, Some(("ci".into(), "pw".into())));
        let r = &c.rules[0];
        assert!(r.matches("https://github.com/acme/app", "main"));
        assert!(!r.matches("https://github.com/acme/app", "dev"));
        assert!(!r.matches("https://github.com/other/app", "main"));
        assert!(!r.matches("https://github.com/acme/app/sub", "main"));
        assert_eq!(r.webhook.as_ref().unwrap().secret.as_deref(), Some("hook"));
        assert_eq!(
            r.mail.as_ref().unwrap().on,
            [EventKind::Failed, EventKind::Fixed]
        );
        assert_eq!(r.status.as_ref().unwrap().token, "tok");
        assert_eq!(c.delivery, DeliverySettings::default());
        assert_eq!(
            c.build_url(kiln_domain::BuildId::new(42)).as_deref(),
            Some("https://ci.example.com/builds/42")
        );
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let e = |text: &str| Config::parse(text, "n.yml", &secrets()).unwrap_err().0;
        let unknown = e("rules:\n  - repo: x\n    webhok: {url: http://a}\n");
        assert!(unknown.starts_with("n.yml:3:"), "{unknown}");
        assert!(unknown.contains("webhok"), "{unknown}");
        let bad_event = e("rules:\n  - repo: x\n    webhook: {url: http://a, events: [borked]}\n");
        assert!(bad_event.starts_with("n.yml:3:"), "{bad_event}");
        assert_eq!(
            e("rules:\n  - repo: x\n    webhook: {url: http://a, secret_secret: NOPE}\n"),
            "n.yml: rules[0].webhook.secret_secret: no secret \"NOPE\" in the secrets file (--secrets-file)"
        );
        assert!(e("rules:\n  - repo: x\n    branch: \"a b\"\n").contains("rules[0].branch"));
        assert!(e("rules:\n  - repo: x\n    mail: {to: [a@b.c]}\n").contains("needs an `smtp:`"));
        assert!(e("rules:\n  - repo: x\n    webhook: {url: ftp://a}\n").contains("http(s)"));
        assert!(e("public_url: [1]\n").starts_with("n.yml:1:"));
    }

    #[test]
    fn the_smtp_ca_file_is_read_beside_the_config_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let smtp = |ca: &str| {
            format!("smtp: {{host: mail.example.com, from: ci@example.com, ca_file: {ca}}}\n")
        };
        let e = |text: &str| {
            Config::parse_in(text, "n.yml", &secrets(), dir.path())
                .unwrap_err()
                .0
        };
        let missing = e(&smtp("nowhere.pem"));
        assert!(
            missing.starts_with("n.yml: smtp.ca_file: cannot read ")
                && missing.contains("nowhere.pem"),
            "{missing}"
        );
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
        assert!(e(&smtp("junk.pem")).contains("holds no PEM certificate"));
        std::fs::write(
            dir.path().join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(e(&smtp("broken.pem")).starts_with("n.yml: smtp.ca_file: "));
        let ca = rcgen::generate_simple_self_signed(vec!["mail.example.com".into()])
            .unwrap()
            .cert
            .pem();
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        let c = Config::parse_in(&smtp("ca.pem"), "n.yml", &secrets(), dir.path()).unwrap();
        assert_eq!(
            c.smtp.unwrap().ca_pem.as_deref(),
            Some(ca.as_bytes()),
            "read relative to the config's directory"
        );
    }

    #[test]
    fn owner_repo_is_derived_from_urls() {
        for (loc, want) in [
            ("https://github.com/acme/app", Some("acme/app")),
            ("https://github.com/acme/app.git/", Some("acme/app")),
            ("git@github.com:acme/app.git", Some("acme/app")),
            ("/srv/git/acme/app", Some("acme/app")),
            ("app", None),
        ] {
            assert_eq!(derive_owner_repo(loc).as_deref(), want, "{loc}");
        }
    }
}
