//! Merging kernel parameters into `/etc/default/grub`.
//!
//! The file is a shell fragment that `update-grub` sources. Only the assignments of
//! `GRUB_CMDLINE_LINUX_DEFAULT` and `GRUB_CMDLINE_LINUX` are touched, and only when their
//! parameters change; every other line, comment, quoting style and parameter is kept.
//! A value this code cannot rewrite without changing its shell meaning (backslash escapes,
//! command substitution, a quote left open across lines, mixed quoting) is an error that
//! names the line, never a guess.

use std::path::{Path, PathBuf};

/// The variable used for normal boots (not recovery); parameters are added here.
pub const VAR_DEFAULT: &str = "GRUB_CMDLINE_LINUX_DEFAULT";
/// The variable used for every boot entry; used when `VAR_DEFAULT` is not assigned.
pub const VAR_LINUX: &str = "GRUB_CMDLINE_LINUX";

/// One kernel parameter option to ensure, e.g. `on` of `intel_iommu`.
///
/// Kernel parameters such as `intel_iommu=` and `iommu=` take comma-separated options; a
/// parameter counts as present when any `key=` token lists `option`, and every option in
/// `conflicts` is removed wherever it appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    pub key: &'static str,
    pub option: &'static str,
    pub conflicts: &'static [&'static str],
}

impl Param {
    /// `key=option`, as written to the command line.
    pub fn token(&self) -> String {
        format!("{}={}", self.key, self.option)
    }
}

/// Why `/etc/default/grub` could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrubError {
    #[error(
        "{}:{line}: the value of {var} {why}, which gpucell does not rewrite; \
         add `{wanted}` to it by hand and run `update-grub`",
        file.display()
    )]
    Uneditable {
        file: PathBuf,
        line: usize,
        var: &'static str,
        why: &'static str,
        wanted: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Double,
    Single,
    None,
}

/// One `[export ]VAR=value[ # comment]` line.
#[derive(Debug, Clone)]
struct Assignment {
    line: usize,
    var: &'static str,
    prefix: String,
    quote: Quote,
    tokens: Vec<String>,
    original: Vec<String>,
    suffix: String,
}

impl Assignment {
    fn render(&self) -> String {
        let value = self.tokens.join(" ");
        let quote = match self.quote {
            Quote::None if self.tokens.len() > 1 => Quote::Double,
            q => q,
        };
        let quoted = match quote {
            Quote::Double => format!("\"{value}\""),
            Quote::Single => format!("'{value}'"),
            Quote::None => value,
        };
        format!("{}{}={}{}", self.prefix, self.var, quoted, self.suffix)
    }
}

/// Parses `line` when it assigns one of the two variables. `Ok(None)` for every other line.
fn parse_assignment(
    line: &str,
    number: usize,
) -> Result<Option<Assignment>, (&'static str, &'static str)> {
    let body = line.trim_end_matches(['\n', '\r']);
    let trimmed = body.trim_start();
    let mut prefix = body[..body.len() - trimmed.len()].to_owned();
    let mut rest = trimmed;
    if let Some(after) = rest.strip_prefix("export") {
        if after.starts_with([' ', '\t']) {
            let after_ws = after.trim_start();
            prefix.push_str(&rest[..rest.len() - after_ws.len()]);
            rest = after_ws;
        }
    }
    let var = if rest.starts_with("GRUB_CMDLINE_LINUX_DEFAULT=") {
        VAR_DEFAULT
    } else if rest.starts_with("GRUB_CMDLINE_LINUX=") {
        VAR_LINUX
    } else {
        return Ok(None);
    };
    let value = &rest[var.len() + 1..];
    let fail = |why| Err((var, why));
    let (quote, inner, after) = match value.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let Some(end) = value[1..].find(q) else {
                return fail("opens a quote that is not closed on the same line");
            };
            let inner = &value[1..1 + end];
            let quote = if q == '"' {
                Quote::Double
            } else {
                Quote::Single
            };
            (quote, inner, &value[end + 2..])
        }
        _ => {
            let end = value.find([' ', '\t']).unwrap_or(value.len());
            (Quote::None, &value[..end], &value[end..])
        }
    };
    if quote != Quote::Single && inner.contains(['\\', '`']) {
        return fail("uses backslash escapes or backquotes");
    }
    if quote != Quote::Single && inner.contains("$(") {
        return fail("uses command substitution");
    }
    if quote == Quote::None && inner.contains(['"', '\'', ';', '&', '|', '<', '>', '(', ')', '$']) {
        return fail("mixes quoting or shell syntax");
    }
    let after_ws = after.trim_start();
    if !(after_ws.is_empty() || after_ws.starts_with('#'))
        || (after_ws.starts_with('#') && after_ws.len() == after.len())
    {
        return fail("is followed by more shell text on the same line");
    }
    let tokens: Vec<String> = inner.split_whitespace().map(str::to_owned).collect();
    Ok(Some(Assignment {
        line: number,
        var,
        prefix,
        quote,
        original: tokens.clone(),
        tokens,
        suffix: after.to_owned(),
    }))
}

/// Key of a `key=value` token with `-` read as `_`, as the kernel compares names.
fn key_of(token: &str) -> String {
    token
        .split_once('=')
        .map_or(token, |(k, _)| k)
        .replace('-', "_")
}

fn options_of(token: &str) -> Vec<&str> {
    token
        .split_once('=')
        .map(|(_, v)| v.split(',').collect())
        .unwrap_or_default()
}

fn has_option(tokens: &[String], p: &Param) -> bool {
    tokens
        .iter()
        .any(|t| key_of(t) == p.key && options_of(t).contains(&p.option))
}

/// Removes `p.conflicts` from every `p.key=` token; drops tokens left with no option.
fn remove_conflicts(tokens: &mut Vec<String>, p: &Param) {
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens.drain(..) {
        if key_of(&t) != p.key || !t.contains('=') {
            out.push(t);
            continue;
        }
        let (key, _) = t.split_once('=').unwrap_or((&t, ""));
        let kept: Vec<&str> = options_of(&t)
            .into_iter()
            .filter(|o| !p.conflicts.contains(o))
            .collect();
        if kept.iter().all(|o| o.is_empty()) {
            continue;
        }
        out.push(format!("{key}={}", kept.join(",")));
    }
    *tokens = out;
}

/// Returns the new content of a grub defaults file with `params` merged, or the same text
/// when nothing needs to change. `file` only names the file in errors.
pub fn merge(file: &Path, text: &str, params: &[Param]) -> Result<String, GrubError> {
    let wanted = params
        .iter()
        .map(Param::token)
        .collect::<Vec<_>>()
        .join(" ");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut assignments = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match parse_assignment(line, i + 1) {
            Ok(Some(a)) => assignments.push(a),
            Ok(None) => {}
            Err((var, why)) => {
                return Err(GrubError::Uneditable {
                    file: file.to_owned(),
                    line: i + 1,
                    var,
                    why,
                    wanted,
                })
            }
        }
    }
    for a in &mut assignments {
        for p in params {
            remove_conflicts(&mut a.tokens, p);
        }
    }
    let target = assignments
        .iter()
        .rposition(|a| a.var == VAR_DEFAULT)
        .or_else(|| assignments.iter().rposition(|a| a.var == VAR_LINUX));
    let mut appended: Vec<String> = Vec::new();
    for p in params {
        if assignments.iter().any(|a| has_option(&a.tokens, p)) || has_option(&appended, p) {
            continue;
        }
        let tokens = match target {
            Some(i) => &mut assignments[i].tokens,
            None => &mut appended,
        };
        match tokens
            .iter_mut()
            .find(|t| key_of(t) == p.key && t.contains('='))
        {
            Some(t) => {
                t.push(',');
                t.push_str(p.option);
            }
            None => tokens.push(p.token()),
        }
    }
    // The same managed token twice (in one or both variables) is written once.
    let managed: Vec<&str> = params.iter().map(|p| p.key).collect();
    let mut seen: Vec<String> = Vec::new();
    for a in &mut assignments {
        a.tokens.retain(|t| {
            if !managed.contains(&key_of(t).as_str()) {
                return true;
            }
            let normal = t.replace('-', "_");
            if seen.contains(&normal) {
                false
            } else {
                seen.push(normal);
                true
            }
        });
    }

    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    for a in &assignments {
        if a.tokens != a.original {
            let line = lines[a.line - 1];
            let ending = &line[line.trim_end_matches(['\n', '\r']).len()..];
            out[a.line - 1] = a.render() + ending;
        }
    }
    let mut result = out.concat();
    if !appended.is_empty() {
        if !result.is_empty() && !result.ends_with('\n') {
            result.push('\n');
        }
        result.push_str("# Added by gpucell: IOMMU on for VFIO GPU passthrough.\n");
        result.push_str(&format!("{VAR_DEFAULT}=\"{}\"\n", appended.join(" ")));
    }
    Ok(result)
}

/// The names of `GRUB_CMDLINE_LINUX*` variables assigned in `text` (for warnings about
/// drop-in files in `/etc/default/grub.d/` that override the main file).
pub fn assigned_vars(text: &str) -> Vec<&'static str> {
    let mut vars = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let var = match parse_assignment(line, i + 1) {
            Ok(Some(a)) => a.var,
            Ok(None) => continue,
            Err((var, _)) => var,
        };
        if !vars.contains(&var) {
            vars.push(var);
        }
    }
    vars
}
