//! What a repository location a user typed names: a URL (fetched as written) or a local path
//! (named by one spelling, so that `./repo`, `/abs/repo/` and `/abs/repo/.git` are one
//! repository to the CLI, the observer and the dispatcher alike).

use std::path::Path;

/// Whether `location` is a URL git fetches from (`scheme://...`, or scp-like `user@host:path`)
/// rather than a path on this machine.
pub fn is_url(location: &str) -> bool {
    let t = location.trim();
    t.contains("://") || super::is_scp_like(t)
}

/// The one spelling of an absolute local path, so one repository is one name: repeated `/` and
/// `.` components dropped, no trailing `/`, and the `.git` directory of a work tree named by the
/// work tree (`/src/app/.git` is `/src/app`). Purely lexical (`..` and symbolic links are left
/// alone: the client resolves those on the machine that has the path, see [`canonical`]).
pub fn local_identity(path: &str) -> String {
    let mut parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.len() > 1 && parts.last() == Some(&".git") {
        parts.pop();
    }
    format!("/{}", parts.join("/"))
}

/// A location as a client names it to the dispatcher: a URL as typed; a local path made absolute
/// with symbolic links resolved. Fails when the local path does not exist.
pub fn canonical(location: &str) -> std::io::Result<String> {
    let location = location.trim();
    if is_url(location) {
        return Ok(location.to_owned());
    }
    let path = std::fs::canonicalize(Path::new(location))?;
    Ok(path.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        for url in [
            "https://example.com/r.git",
            "file:///srv/r",
            "ssh://git@host/r",
            "git@host:r.git",
            " host:path/r ",
        ] {
            assert!(is_url(url), "{url}");
        }
        for path in ["/srv/r", "./r", "r", "/srv/a@b/r", "/srv/a:b/r", "../x@y"] {
            assert!(!is_url(path), "{path}");
        }
    }

    #[test]
    fn a_local_path_has_one_spelling() {
        assert_eq!(local_identity("/srv//r/./"), "/srv/r");
        assert_eq!(local_identity("/srv/r/.git"), "/srv/r");
        assert_eq!(local_identity("/.git"), "/.git");
        assert_eq!(local_identity("/"), "/");
    }

    #[test]
    fn canonical_resolves_local_paths_and_keeps_urls() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let real = dir.path().join("real");
        std::fs::create_dir(&real)?;
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link)?;
        let want = std::fs::canonicalize(&real)?.to_string_lossy().into_owned();
        assert_eq!(canonical(&link.to_string_lossy())?, want);
        assert_eq!(canonical(" https://h/r ")?, "https://h/r");
        assert!(canonical(&dir.path().join("missing").to_string_lossy()).is_err());
        Ok(())
    }
}
