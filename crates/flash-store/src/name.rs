//! Model names: `org/name` with an optional `:revision`, checked so that no
//! name can point outside the store.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName {
    pub org: String,
    pub name: String,
    pub revision: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model name {input:?}: {why}")]
pub struct NameError {
    pub input: String,
    pub why: String,
}

const MAX_PART: usize = 96;

fn check_part(input: &str, part: &str, what: &str) -> Result<(), NameError> {
    let err = |why: String| NameError {
        input: input.to_string(),
        why,
    };
    if part.is_empty() {
        return Err(err(format!("the {what} is empty")));
    }
    if part == "." || part == ".." {
        return Err(err(format!("the {what} may not be {part:?}")));
    }
    if part.len() > MAX_PART {
        return Err(err(format!(
            "the {what} is longer than {MAX_PART} characters"
        )));
    }
    if part.starts_with('.') {
        return Err(err(format!("the {what} may not start with '.'")));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(err(format!(
            "the {what} contains {c:?}; use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

impl FromStr for ModelName {
    type Err = NameError;
    fn from_str(input: &str) -> Result<Self, NameError> {
        let (repo, revision) = match input.split_once(':') {
            Some((r, rev)) => (r, Some(rev)),
            None => (input, None),
        };
        let Some((org, name)) = repo.split_once('/') else {
            return Err(NameError {
                input: input.to_string(),
                why: "expected ORG/NAME (for example Qwen/Qwen3-0.6B)".into(),
            });
        };
        check_part(input, org, "organisation")?;
        check_part(input, name, "name")?;
        if let Some(rev) = revision {
            check_part(input, rev, "revision")?;
        }
        Ok(ModelName {
            org: org.to_string(),
            name: name.to_string(),
            revision: revision.map(str::to_string),
        })
    }
}

impl ModelName {
    /// `org/name`, the Hub repository id.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }

    /// Path relative to the store's `models/` folder. Revisions live beside
    /// the default as `name@revision` ('@' cannot appear in a part).
    pub fn rel_path(&self) -> PathBuf {
        let leaf = match &self.revision {
            Some(r) => format!("{}@{}", self.name, r),
            None => self.name.clone(),
        };
        PathBuf::from(&self.org).join(leaf)
    }

    /// Inverse of [`ModelName::rel_path`].
    pub fn from_rel(org: &str, leaf: &str) -> Option<Self> {
        let (name, revision) = match leaf.split_once('@') {
            Some((n, r)) => (n, Some(r)),
            None => (leaf, None),
        };
        let text = match revision {
            Some(r) => format!("{org}/{name}:{r}"),
            None => format!("{org}/{name}"),
        };
        text.parse().ok()
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.name)?;
        if let Some(r) = &self.revision {
            write!(f, ":{r}")?;
        }
        Ok(())
    }
}

/// A model, or one tensor-parallel rank of a model stored split (`flash
/// pull --tp N`): `ORG/NAME[:REVISION][#RANK]`. The daemon keeps each rank
/// as its own image (`#` cannot appear in a name, so the forms never clash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RankedName {
    pub name: ModelName,
    pub rank: Option<u32>,
}

impl FromStr for RankedName {
    type Err = NameError;
    fn from_str(input: &str) -> Result<Self, NameError> {
        let (model, rank) = match input.split_once('#') {
            Some((m, r)) => {
                let rank = r.parse::<u32>().map_err(|_| NameError {
                    input: input.to_string(),
                    why: format!(
                        "the rank after '#' must be a number (0 for the first GPU's), not {r:?}"
                    ),
                })?;
                (m, Some(rank))
            }
            None => (input, None),
        };
        let name = model.parse::<ModelName>().map_err(|e| NameError {
            input: input.to_string(),
            why: e.why,
        })?;
        Ok(RankedName { name, rank })
    }
}

impl fmt::Display for RankedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(r) = self.rank {
            write!(f, "#{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_names_parse_and_print_back() {
        let r: RankedName = "Qwen/Qwen3-8B:main#1".parse().unwrap();
        assert_eq!(r.name.to_string(), "Qwen/Qwen3-8B:main");
        assert_eq!(r.rank, Some(1));
        assert_eq!(r.to_string(), "Qwen/Qwen3-8B:main#1");
        let plain: RankedName = "Qwen/Qwen3-8B".parse().unwrap();
        assert_eq!(
            (plain.rank, plain.to_string().as_str()),
            (None, "Qwen/Qwen3-8B")
        );
        for bad in [
            "Qwen/Qwen3-8B#",
            "Qwen/Qwen3-8B#x",
            "Qwen/Qwen3-8B#-1",
            "Qwen#1",
        ] {
            let e = bad.parse::<RankedName>().unwrap_err();
            assert_eq!(e.input, bad);
        }
        let e = "o/m#two".parse::<RankedName>().unwrap_err();
        assert!(e.why.contains("\"two\""), "{e}");
    }

    #[test]
    fn accepts_hub_style_names() {
        let n: ModelName = "Qwen/Qwen3-0.6B".parse().unwrap();
        assert_eq!(n.repo(), "Qwen/Qwen3-0.6B");
        assert_eq!(n.rel_path(), PathBuf::from("Qwen/Qwen3-0.6B"));
        let r: ModelName = "meta-llama/Llama-3.2-1B:v1.0".parse().unwrap();
        assert_eq!(r.to_string(), "meta-llama/Llama-3.2-1B:v1.0");
        assert_eq!(
            ModelName::from_rel("meta-llama", "Llama-3.2-1B@v1.0"),
            Some(r)
        );
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "",
            "a",
            "/a",
            "a/",
            "../a",
            "a/..",
            "a/b/c",
            "/etc/passwd",
            "a/b\0",
            "a\\b/c",
            "a/.hidden",
            "a/b:",
            "a/b:../x",
            "a/b c",
            "./a",
        ] {
            let e = bad.parse::<ModelName>().unwrap_err();
            assert!(e.to_string().contains("invalid model name"), "{bad}: {e}");
        }
    }
}
