//! Validation of every name that ends up in a URL or a path, and URL encoding.
//!
//! Repo names and revisions come from the user, file paths, etags and commits from the server:
//! all of them become parts of paths under the cache, so none may escape it.

use crate::HubError;

const MAX_REPO_ID: usize = 96;

/// `org/name` or `name`, each part of `[A-Za-z0-9_.-]`, not starting or ending with `.`/`-`,
/// no `--` (the cache folder uses it as separator) and no `..`; at most 96 characters
/// (the rules of `huggingface_hub.utils.validate_repo_id`).
pub(crate) fn validate_repo(repo: &str) -> Result<(), HubError> {
    let fail = |why: &str| {
        Err(HubError::InvalidRepo {
            repo: repo.to_string(),
            why: why.to_string(),
        })
    };
    if repo.is_empty() {
        return fail("it is empty");
    }
    if repo.len() > MAX_REPO_ID {
        return fail("it is longer than 96 characters");
    }
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() > 2 {
        return fail("it has more than one `/`");
    }
    for part in &parts {
        if part.is_empty() {
            return fail("a part is empty");
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return fail("only letters, digits, `_`, `-` and `.` are allowed");
        }
        if part.starts_with(['.', '-']) || part.ends_with(['.', '-']) {
            return fail("a part starts or ends with `.` or `-`");
        }
    }
    if repo.contains("..") || repo.contains("--") {
        return fail("`..` and `--` are not allowed");
    }
    Ok(())
}

/// A branch, tag, `refs/pr/N` or commit. It names the file `refs/<revision>` in the cache, so
/// it must be a relative path of plain components.
pub(crate) fn validate_revision(revision: &str) -> Result<(), HubError> {
    let fail = |why: &str| {
        Err(HubError::InvalidRevision {
            revision: revision.to_string(),
            why: why.to_string(),
        })
    };
    if revision.is_empty() {
        return fail("it is empty");
    }
    if revision.len() > 256 {
        return fail("it is longer than 256 characters");
    }
    if revision.chars().any(|c| c.is_control() || c == '\\') {
        return fail("control characters and `\\` are not allowed");
    }
    if let Err(why) = check_relative_path(revision) {
        return fail(&why);
    }
    Ok(())
}

/// A file path of the repo, as the server lists it: relative, `/`-separated, no empty, `.` or
/// `..` component, no `\`, no control characters.
pub(crate) fn check_repo_file(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty file path".to_string());
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err(format!("file path {path:?} has control characters or `\\`"));
    }
    check_relative_path(path).map_err(|why| format!("file path {path:?} {why}"))
}

fn check_relative_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        return Err("is absolute".to_string());
    }
    for comp in path.split('/') {
        match comp {
            "" => return Err("has an empty component".to_string()),
            "." | ".." => return Err("has a `.` or `..` component".to_string()),
            _ => {}
        }
    }
    Ok(())
}

/// A name from the server used as one path component (commit hash, blob name): ASCII letters,
/// digits, `-` and `_` only, so it cannot be `..`, hold a `/`, or end in `.incomplete`.
pub(crate) fn check_component(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 256 {
        return Err(format!("{what} {value:?} is empty or too long"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{what} {value:?} has characters other than letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// The cache folder of a model repo: `models--org--name`.
pub(crate) fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The blob name huggingface_hub derives from an `ETag`: without `W/` and quotes.
pub(crate) fn normalize_etag(etag: &str) -> &str {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"')
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when `keep_slash`).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of an absolute URL.
pub(crate) fn origin(url: &str) -> Option<&str> {
    let after = url.find("://")? + 3;
    let end = url[after..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after + i);
    Some(&url[..end])
}

/// Resolves a `Location` header against the URL that answered it.
pub(crate) fn join_location(base: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    let origin = origin(base)?;
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = &origin[..origin.find("://")?];
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{origin}{location}"));
    }
    // Relative to the base's directory.
    let path_end = base[origin.len()..]
        .find(['?', '#'])
        .map_or(base.len(), |i| origin.len() + i);
    let dir_end = base[..path_end].rfind('/').filter(|&i| i >= origin.len())?;
    Some(format!("{}/{location}", &base[..dir_end]))
}

/// True when the URL's origin is the endpoint's: only then is the token sent.
pub(crate) fn same_origin(a: &str, b: &str) -> bool {
    match (origin(a), origin(b)) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in ["gpt2", "Qwen/Qwen3-8B", "org_1/name.v2", "a/b"] {
            assert!(validate_repo(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "a/b/c",
            "../x",
            "a/..",
            "..",
            ".",
            "a/.b",
            "a-/b",
            "a--b/c",
            "a/b..c",
            "a b",
            "a\\b",
            "/etc/passwd",
            "a/b\n",
        ] {
            assert!(
                matches!(validate_repo(bad), Err(HubError::InvalidRepo { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_repo(&"a".repeat(97)).is_err());
    }

    #[test]
    fn revisions() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "..", "../main", "/main", "a//b", "a/./b", "a\\b", "a\0b", "main/",
        ] {
            assert!(validate_revision(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_files() {
        assert!(check_repo_file("config.json").is_ok());
        assert!(check_repo_file("a/b/c.safetensors").is_ok());
        assert!(check_repo_file(".gitattributes").is_ok());
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "./a",
            "a\\..\\b",
            "a\0",
        ] {
            assert!(check_repo_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn components_and_etags() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("abc"), "abc");
        assert!(check_component("etag", "a1b2-c3_d").is_ok());
        for bad in ["", "..", "a/b", "x.incomplete", "a b"] {
            assert!(check_component("etag", bad).is_err(), "{bad:?}");
        }
        assert_eq!(repo_folder("Qwen/Qwen3-8B"), "models--Qwen--Qwen3-8B");
        assert_eq!(repo_folder("gpt2"), "models--gpt2");
    }

    #[test]
    fn urls() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c+d.json", true), "a%20b/c%2Bd.json");
        assert_eq!(origin("https://hf.co:443/a/b?x"), Some("https://hf.co:443"));
        assert_eq!(origin("http://h"), Some("http://h"));
        assert_eq!(
            join_location("http://h:1/a/resolve/x/f", "/b/resolve/x/f").as_deref(),
            Some("http://h:1/b/resolve/x/f")
        );
        assert_eq!(
            join_location("http://h:1/a/b", "https://cdn/x").as_deref(),
            Some("https://cdn/x")
        );
        assert_eq!(
            join_location("https://h/a/b", "//cdn/x").as_deref(),
            Some("https://cdn/x")
        );
        assert_eq!(
            join_location("http://h/a/b?q=1", "c").as_deref(),
            Some("http://h/a/c")
        );
        assert!(same_origin("http://127.0.0.1:5/x", "http://127.0.0.1:5"));
        assert!(!same_origin("http://127.0.0.1:5/x", "http://127.0.0.1:6"));
        assert!(!same_origin(
            "https://cdn.example/x",
            "https://huggingface.co"
        ));
    }
}
