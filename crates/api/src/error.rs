//! Errors of loading: which file, which line, which object, which field, and what is wrong.
//!
//! Nothing here reads files; the loaders build these values and callers print them.

use std::fmt;

/// One step of a [`FieldPath`]: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A key of a mapping, like `spec`.
    Key(String),
    /// An index into a sequence, like the `2` of `plugins[2]`.
    Index(usize),
}

/// The path of a field inside one YAML document, printed like `spec.rules[0].targets[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The path of the document itself.
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    /// Parses a dotted path like `spec.rules[0].targets`; keys must not contain `.` or `[`.
    pub fn parse(dotted: &str) -> Self {
        let mut segments = Vec::new();
        for part in dotted.split('.').filter(|p| !p.is_empty()) {
            let (key, mut rest) = match part.find('[') {
                Some(at) => (&part[..at], &part[at..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_string()));
            }
            while let Some(body) = rest.strip_prefix('[') {
                let Some(end) = body.find(']') else { break };
                match body[..end].parse::<usize>() {
                    Ok(i) => segments.push(Segment::Index(i)),
                    Err(_) => segments.push(Segment::Key(body[..end].to_string())),
                }
                rest = &body[end + 1..];
            }
        }
        FieldPath(segments)
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.into()));
        FieldPath(segments)
    }

    /// This path extended by a sequence index.
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        FieldPath(segments)
    }

    /// The steps of the path, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// True for the path of the whole document.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for FieldPath {
    fn from(dotted: &str) -> Self {
        FieldPath::parse(dotted)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                // Label keys such as `app.kubernetes.io/name` would read as several steps.
                Segment::Key(key) if key.is_empty() || key.contains(['.', '[', ']', ' ']) => {
                    write!(f, "[{key:?}]")?
                }
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
            }
        }
        Ok(())
    }
}

/// A rule broken by one field of an object, as found by a `validate` method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where the field is, from the root of the object's document.
    pub path: FieldPath,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl FieldError {
    /// A rule broken at `path`.
    pub fn new(path: impl Into<FieldPath>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// One problem found while loading a file, with everything needed to find and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or other source) the text came from, as the caller named it.
    pub file: String,
    /// The 1-based line in the whole file, when known.
    pub line: Option<usize>,
    /// The object the problem is in, like `InferenceModelRewrite "chat"`.
    pub object: Option<String>,
    /// The field the problem is about.
    pub path: FieldPath,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(object) = &self.object {
            write!(f, " (in {object})")?;
        }
        Ok(())
    }
}

/// Why a pool file or an EndpointPickerConfig could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: cannot read the file: {source}")]
    Read {
        /// The path as given.
        file: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The text was read but is not valid; every problem found is listed, in file order.
    #[error("{}", join_problems(.problems))]
    Invalid {
        /// At least one problem.
        problems: Vec<Problem>,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl LoadError {
    /// The line of the first problem, 1-based, in the whole file.
    pub fn line(&self) -> Option<usize> {
        self.first().and_then(|p| p.line)
    }

    /// The field path of the first problem.
    pub fn path(&self) -> Option<&FieldPath> {
        self.first().map(|p| &p.path)
    }

    /// Every problem found; empty when the file could not be read.
    pub fn problems(&self) -> &[Problem] {
        match self {
            LoadError::Read { .. } => &[],
            LoadError::Invalid { problems } => problems,
        }
    }

    fn first(&self) -> Option<&Problem> {
        self.problems().first()
    }
}
