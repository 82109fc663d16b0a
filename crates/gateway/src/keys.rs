//! API keys for bearer-token auth, each able to carry a default objective (priority).
//!
//! Keys come from a file (`KEY [OBJECTIVE]` per line, `#` comments) or an environment value
//! (`KEY[:OBJECTIVE],...`). Parsing only; the request path asks [`ApiKeys::lookup`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A problem with a key file or key list, saying where and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read API key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("API key list entry {entry}: {message}")]
    Entry { entry: usize, message: String },
    #[error("{0} holds no API keys; with auth on every request would be refused (add `KEY [OBJECTIVE]` lines, or turn auth off)")]
    Empty(String),
}

/// Accepted API keys, each with an optional default `x-gateway-inference-objective`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    keys: HashMap<String, Option<String>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys themselves.
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

impl ApiKeys {
    /// Reads `path`: one `KEY [OBJECTIVE]` per line; blank lines and `#` comments skipped.
    pub fn from_file(path: &Path) -> Result<ApiKeys, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut keys = ApiKeys::default();
        let mut seen_at: HashMap<String, usize> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| KeysError::Line {
                path: path.to_path_buf(),
                line,
                message,
            };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut words = content.split_whitespace();
            let key = words.next().unwrap_or_default();
            let objective = words.next();
            if let Some(extra) = words.next() {
                return Err(err(format!(
                    "expected `KEY [OBJECTIVE]`, found a third word {extra:?}"
                )));
            }
            check_key(key).map_err(err)?;
            if let Some(first) = seen_at.insert(key.to_string(), line) {
                return Err(err(format!(
                    "this key is already listed on line {first}; list each key once"
                )));
            }
            keys.keys
                .insert(key.to_string(), objective.map(str::to_string));
        }
        if keys.keys.is_empty() {
            return Err(KeysError::Empty(path.display().to_string()));
        }
        Ok(keys)
    }

    /// Parses `KEY[:OBJECTIVE],...` (the `INFERGATE_API_KEYS` form); spaces around entries
    /// are ignored.
    pub fn from_env_value(s: &str) -> Result<ApiKeys, KeysError> {
        let mut keys = ApiKeys::default();
        for (i, entry) in s.split(',').enumerate() {
            let n = i + 1;
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let err = |message: String| KeysError::Entry { entry: n, message };
            let (key, objective) = match entry.split_once(':') {
                Some((k, o)) => {
                    let o = o.trim();
                    if o.is_empty() || o.chars().any(char::is_whitespace) {
                        return Err(err(format!(
                            "objective after ':' must be one non-empty word, found {o:?}"
                        )));
                    }
                    (k.trim(), Some(o.to_string()))
                }
                None => (entry, None),
            };
            check_key(key).map_err(err)?;
            if keys.keys.insert(key.to_string(), objective).is_some() {
                return Err(err("this key is listed twice; list each key once".into()));
            }
        }
        if keys.keys.is_empty() {
            return Err(KeysError::Empty("the API key list".into()));
        }
        Ok(keys)
    }

    /// Both sets of keys; on a key present in both, `other`'s objective wins.
    pub fn merge(mut self, other: ApiKeys) -> ApiKeys {
        self.keys.extend(other.keys);
        self
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `None` when the key is unknown; otherwise the key's default objective, if any.
    pub fn lookup(&self, key: &str) -> Option<Option<&str>> {
        self.keys.get(key).map(Option::as_deref)
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty API key".into());
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "API keys must be printable ASCII without spaces (they travel in the Authorization header); found {c:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_file(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let p = std::env::temp_dir().join(format!(
            "infergate-keys-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&p, text).unwrap();
        (p.clone(), Rm(p))
    }

    #[test]
    fn file_keys_with_objectives_comments_and_blank_lines() {
        let (p, _rm) = mk_file("# team keys\n\nk1 interactive\nk2   # no objective\n");
        let keys = ApiKeys::from_file(&p).unwrap();
        assert_eq!(keys.lookup("k1"), Some(Some("interactive")));
        assert_eq!(keys.lookup("k2"), Some(None));
        assert_eq!(keys.lookup("k3"), None);
    }

    #[test]
    fn file_errors_name_the_file_and_line() {
        let (p, _rm) = mk_file("k1\nk2 a b\n");
        let e = ApiKeys::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:2:", p.display())), "{e}");
        assert!(e.contains("third word"), "{e}");
        let (p, _rm) = mk_file("k1\n\nk1 x\n");
        let e = ApiKeys::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("line 1"), "{e}");
        let (p, _rm) = mk_file("# nothing\n");
        assert!(ApiKeys::from_file(&p)
            .unwrap_err()
            .to_string()
            .contains("no API keys"));
    }

    #[test]
    fn env_value_keys_and_merge() {
        let keys = ApiKeys::from_env_value(" bk:batch, ik:interactive ,plain,").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.lookup("bk"), Some(Some("batch")));
        assert_eq!(keys.lookup("plain"), Some(None));
        let e = ApiKeys::from_env_value("a,b:").unwrap_err().to_string();
        assert!(e.contains("entry 2"), "{e}");
        let merged = keys.merge(ApiKeys::from_env_value("plain:x,new").unwrap());
        assert_eq!(merged.lookup("plain"), Some(Some("x")));
        assert_eq!(merged.len(), 4);
        assert!(!format!("{merged:?}").contains("plain"));
    }
}
