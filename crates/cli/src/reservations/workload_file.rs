//! Reading a workload file (TOML, or JSON) into `leasehold_api::WorkloadFile`,
//! and pointing at the line of a field named by a path such as
//! `instance[1].vcpus`: the path a syntax or type error carries, the one core's
//! validation names, or the one the broker's refusal names in `error.field`.

use leasehold_api::{ms_from_rfc3339, WorkloadFile};
use leasehold_core::reservation::Workload;
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess};
use std::fmt;
use std::io::Read as _;
use std::ops::Range;
use std::path::Path;

/// Largest workload file read (a workload holds at most 1,024 instances).
const MAX_WORKLOAD_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Toml,
    Json,
}

/// A workload file's text, its name as the user gave it and its format.
#[derive(Debug, Clone)]
pub struct WorkloadSource {
    pub file_name: String,
    pub text: String,
    pub format: FileFormat,
}

/// A problem with a workload file: `FILE:LINE: field: problem`, each part
/// present when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub file_name: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file_name)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for FileProblem {}

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// `instance[1].vcpus` as its segments; `None` for a path that is not one
/// (`.` for the whole document, or something unparsable).
pub fn parse_field_path(path: &str) -> Option<Vec<PathSegment>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            segments.push(PathSegment::Key(key.to_string()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let (index, after) = inner.split_once(']')?;
            segments.push(PathSegment::Index(index.parse().ok()?));
            rest = after;
        }
        if !rest.is_empty() {
            return None;
        }
    }
    (!segments.is_empty()).then_some(segments)
}

/// Whether a key in the file is the one a path names: the arrays may be
/// spelt `instance`/`rule` or `instances`/`rules` (aliases), in the file and
/// in messages alike.
fn key_matches(wanted: &str, found: &str) -> bool {
    fn singular(key: &str) -> &str {
        match key {
            "instances" => "instance",
            "rules" => "rule",
            other => other,
        }
    }
    singular(wanted) == singular(found)
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl WorkloadSource {
    /// Reads `path`; JSON when its name ends in `.json` or its text starts
    /// with `{`, TOML otherwise.
    pub fn read(path: &Path) -> Result<WorkloadSource, FileProblem> {
        let file_name = path.display().to_string();
        let problem = |problem: String| FileProblem {
            file_name: file_name.clone(),
            line: None,
            field: None,
            problem,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| {
                // One byte past the bound tells a file that is too long.
                std::io::Read::take(file, MAX_WORKLOAD_FILE_BYTES + 1).read_to_string(&mut text)
            })
            .map_err(|e| problem(format!("failed to read the workload file: {e}")))?;
        if text.len() as u64 > MAX_WORKLOAD_FILE_BYTES {
            return Err(problem(format!(
                "the workload file is longer than {MAX_WORKLOAD_FILE_BYTES} bytes"
            )));
        }
        Ok(WorkloadSource::from_text(&file_name, text))
    }

    pub fn from_text(file_name: &str, text: String) -> WorkloadSource {
        let json =
            file_name.to_ascii_lowercase().ends_with(".json") || text.trim_start().starts_with('{');
        WorkloadSource {
            file_name: file_name.to_string(),
            text,
            format: if json {
                FileFormat::Json
            } else {
                FileFormat::Toml
            },
        }
    }

    /// A problem with `field` (a path as the broker and core name fields),
    /// at that field's line when the file has it.
    pub fn problem_at(&self, field: &str, problem: &str) -> FileProblem {
        // Messages from core and the broker start with the field itself.
        let problem = problem
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or(problem);
        FileProblem {
            file_name: self.file_name.clone(),
            line: self.line_of_field(field),
            field: Some(field.to_string()),
            problem: problem.to_string(),
        }
    }

    /// The line of `field`, or of the nearest enclosing table or array the
    /// file has when the field itself is missing.
    pub fn line_of_field(&self, field: &str) -> Option<usize> {
        let path = parse_field_path(field)?;
        match self.format {
            FileFormat::Toml => toml_line_of(&self.text, &path),
            FileFormat::Json => (1..=path.len())
                .rev()
                .find_map(|len| json_line_of(&self.text, &path[..len])),
        }
    }

    /// The file as a workload: syntax and types, then the times, then core's
    /// validation (the broker's own rules), each problem at its line.
    pub fn parse(&self) -> Result<WorkloadFile, FileProblem> {
        let file = match self.format {
            FileFormat::Toml => self.parse_toml()?,
            FileFormat::Json => self.parse_json()?,
        };
        self.check_locally(&file)?;
        Ok(file)
    }

    fn parse_toml(&self) -> Result<WorkloadFile, FileProblem> {
        let deserializer = toml::Deserializer::parse(&self.text)
            .map_err(|error| self.toml_problem(None, &error))?;
        let (file, ignored) = deserialize_noting_ignored(deserializer).map_err(|error| {
            let field = field_of(error.path());
            self.toml_problem(field, error.inner())
        })?;
        self.refuse_ignored(ignored)?;
        Ok(file)
    }

    /// Core's instance and rule types let unknown keys pass, so a misspelt
    /// `imgae` would be dropped without a word: refuse it here instead.
    fn refuse_ignored(&self, ignored: Option<String>) -> Result<(), FileProblem> {
        match ignored {
            Some(field) => Err(self.problem_at(
                &field,
                "unknown field: not part of a workload file (misspelt?)",
            )),
            None => Ok(()),
        }
    }

    fn toml_problem(&self, field: Option<String>, error: &toml::de::Error) -> FileProblem {
        let line = error
            .span()
            .map(|span| line_of_offset(&self.text, span.start))
            .or_else(|| field.as_deref().and_then(|f| self.line_of_field(f)));
        FileProblem {
            file_name: self.file_name.clone(),
            line,
            field,
            problem: error.message().trim().to_string(),
        }
    }

    fn parse_json(&self) -> Result<WorkloadFile, FileProblem> {
        let mut deserializer = serde_json::Deserializer::from_str(&self.text);
        let (file, ignored) = deserialize_noting_ignored(&mut deserializer)
            .map_err(|error| self.json_problem(field_of(error.path()), error.inner()))?;
        deserializer
            .end()
            .map_err(|error| self.json_problem(None, &error))?;
        self.refuse_ignored(ignored)?;
        Ok(file)
    }

    fn json_problem(&self, field: Option<String>, error: &serde_json::Error) -> FileProblem {
        let text = error.to_string();
        // serde_json appends the position; the line is reported apart.
        let problem = match text.rsplit_once(" at line ") {
            Some((message, _)) if error.line() > 0 => message.to_string(),
            _ => text,
        };
        FileProblem {
            file_name: self.file_name.clone(),
            line: (error.line() > 0).then_some(error.line()),
            field,
            problem,
        }
    }

    /// The times first (they are what users get wrong), then everything core
    /// checks, so a bad file is pointed at without a round trip.
    fn check_locally(&self, file: &WorkloadFile) -> Result<(), FileProblem> {
        let start_ms = ms_from_rfc3339(&file.start).map_err(|e| self.problem_at("start", &e))?;
        let end_ms = ms_from_rfc3339(&file.end).map_err(|e| self.problem_at("end", &e))?;
        let workload = Workload {
            name: file.name.clone(),
            owner: String::new(),
            priority: file.priority,
            start_ms,
            end_ms,
            instances: file.instances.clone(),
            rules: file.rules.clone(),
            seq: 0,
        };
        workload
            .validate()
            .map_err(|error| self.problem_at(&error.field, &error.problem))
    }
}

/// A path from serde_path_to_error as a field name; `None` for the whole
/// document.
fn field_of(path: &serde_path_to_error::Path) -> Option<String> {
    let text = path.to_string();
    (text != "." && !text.is_empty()).then_some(text)
}

/// The workload, with the path of the first key it ignored (if any), and
/// the path of the field at fault when it fails.
fn deserialize_noting_ignored<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<(WorkloadFile, Option<String>), serde_path_to_error::Error<D::Error>> {
    let mut ignored = None;
    let mut note = |path: serde_ignored::Path| {
        ignored.get_or_insert_with(|| ignored_field_path(&path));
    };
    let file = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        deserializer,
        &mut note,
    ))?;
    Ok((file, ignored))
}

/// serde_ignored's path (`instance.1.imgae`) spelt as fields are named
/// everywhere else (`instance[1].imgae`).
fn ignored_field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_field_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_field_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_field_path(parent),
    }
}

/// The line of the deepest part of `path` the TOML document has: the key's
/// own line for a key, the table's header for an `[[instance]]` entry.
fn toml_line_of(text: &str, path: &[PathSegment]) -> Option<usize> {
    let document = toml_edit::Document::parse(text).ok()?;
    let mut item = document.as_item();
    let mut best: Option<Range<usize>> = None;
    for segment in path {
        let (span, next) = match segment {
            PathSegment::Key(wanted) => match toml_key(item, wanted) {
                Some(found) => found,
                None => break,
            },
            PathSegment::Index(index) => match item.get(*index) {
                Some(next) => (next.span().or_else(|| first_key_span(next)), next),
                None => break,
            },
        };
        best = span.or(best);
        item = next;
    }
    best.map(|span| line_of_offset(text, span.start))
}

/// The key named `wanted` (or its alias) in a table or inline table: its
/// span and its value.
fn toml_key<'a>(
    item: &'a toml_edit::Item,
    wanted: &str,
) -> Option<(Option<Range<usize>>, &'a toml_edit::Item)> {
    let pairs: Vec<(&toml_edit::Key, &toml_edit::Item)> = match item {
        toml_edit::Item::Table(table) => table
            .iter()
            .filter_map(|(name, _)| table.get_key_value(name))
            .collect(),
        toml_edit::Item::Value(value) => {
            let table = value.as_inline_table()?;
            table
                .iter()
                .filter_map(|(name, _)| table.get_key_value(name))
                .collect()
        }
        _ => return None,
    };
    let (key, value) = pairs
        .into_iter()
        .find(|(key, _)| key_matches(wanted, key.get()))?;
    Some((key.span().or_else(|| value.span()), value))
}

/// A table without a span of its own (an `[[instance]]` entry may lack
/// one) is placed by its first key.
fn first_key_span(item: &toml_edit::Item) -> Option<Range<usize>> {
    let table = item.as_table_like()?;
    let (name, _) = table.iter().next()?;
    table.get_key_value(name)?.0.span()
}

/// Marks the error the JSON walk stops with when it reaches the field.
const FIELD_FOUND: &str = "leasehold: field found";

/// The line of `path` in JSON text, or `None` when the text lacks it.
/// serde_json knows the line it is reading, so the walk stops with an error
/// where the field is and that error carries the line.
fn json_line_of(text: &str, path: &[PathSegment]) -> Option<usize> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    match (JsonPathSeek { path }).deserialize(&mut deserializer) {
        Err(error) if error.to_string().starts_with(FIELD_FOUND) && error.line() > 0 => {
            Some(error.line())
        }
        _ => None,
    }
}

/// Walks a JSON document along `path`, skipping everything else, and fails
/// with [`FIELD_FOUND`] on reaching its last segment.
struct JsonPathSeek<'p> {
    path: &'p [PathSegment],
}

impl<'de> DeserializeSeed<'de> for JsonPathSeek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            return Err(D::Error::custom(FIELD_FOUND));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonPathSeek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((PathSegment::Key(wanted), rest)) = self.path.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        while let Some(key) = map.next_key::<String>()? {
            if !key_matches(wanted, &key) {
                map.next_value::<IgnoredAny>()?;
            } else if rest.is_empty() {
                // Stopped right after the key: the error carries its line.
                return Err(A::Error::custom(FIELD_FOUND));
            } else {
                map.next_value_seed(JsonPathSeek { path: rest })?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let wanted = match self.path.first() {
            Some(PathSegment::Index(index)) => Some(*index),
            _ => None,
        };
        let mut at = 0;
        loop {
            let found = if Some(at) == wanted {
                seq.next_element_seed(JsonPathSeek {
                    path: &self.path[1..],
                })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if found.is_none() {
                return Ok(());
            }
            at += 1;
        }
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}
