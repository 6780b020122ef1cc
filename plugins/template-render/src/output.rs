//! Writing one output file: skip when unchanged, check a candidate first.

use crate::host::{Host, RunResult};

/// The hidden candidate beside `path`: `dir/name` → `dir/.name.candidate`.
pub fn candidate_path(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.{name}.candidate"),
        None => format!(".{path}.candidate"),
    }
}

/// Puts `text` into `path` unless it already holds exactly that. With a
/// `check` command the text goes to a candidate file first; the command
/// runs on it, and only an exit code of 0 lets the candidate replace
/// `path`. The candidate is removed on every other path. Returns whether
/// `path` changed.
///
/// # Errors
///
/// The file could not be read or written, or the check refused the
/// candidate, failed to run or timed out (its output tails are logged).
pub fn write(
    host: &impl Host,
    check: Option<&str>,
    path: &str,
    text: &[u8],
) -> Result<bool, String> {
    let current = host
        .read_file(path)
        .map_err(|e| format!("reading {path} failed: {e}"))?;
    if current.as_deref() == Some(text) {
        return Ok(false);
    }
    let Some(check) = check else {
        host.replace_file(path, text)
            .map_err(|e| format!("writing {path} failed: {e}"))?;
        return Ok(true);
    };
    let candidate = candidate_path(path);
    let result = host
        .replace_file(&candidate, text)
        .map_err(|e| format!("writing candidate {candidate} failed: {e}"))
        .and_then(|()| {
            let verdict = host.run(check, Some(&candidate));
            refusal(check, path, verdict).map_or(Ok(()), Err)
        })
        .and_then(|()| {
            host.rename_file(&candidate, path)
                .map_err(|e| format!("moving the checked {candidate} over {path} failed: {e}"))
        });
    if let Err(e) = result {
        if let Err(gone) = host.remove_file(&candidate) {
            host.warn(&format!(
                "template-render: removing {candidate} failed: {gone}"
            ));
        }
        return Err(e);
    }
    Ok(true)
}

/// Why check `check` refused the candidate for `path`, with its output;
/// `None` when it passed. Logs the command's output tails on refusal.
fn refusal(check: &str, path: &str, verdict: Result<RunResult, String>) -> Option<String> {
    let r = match verdict {
        Ok(r) => r,
        Err(e) => return Some(format!("check {check:?} could not run: {e}; {path} kept")),
    };
    let how = if r.timed_out {
        format!("timed out after {} ms", r.duration_ms)
    } else {
        match r.exit_code {
            Some(0) => return None,
            Some(code) => format!("exited with {code}"),
            None => "was killed".to_owned(),
        }
    };
    let tail = |s: &str| {
        let s = s.trim();
        if s.is_empty() {
            "(none)".to_owned()
        } else {
            s.to_owned()
        }
    };
    Some(format!(
        "check {check:?} refused the new {path} ({how}); {path} kept; stderr: {}; stdout: {}",
        tail(&r.stderr_tail),
        tail(&r.stdout_tail),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_hidden_beside_the_target() {
        assert_eq!(candidate_path("nginx.conf"), ".nginx.conf.candidate");
        assert_eq!(
            candidate_path("conf.d/up.conf"),
            "conf.d/.up.conf.candidate"
        );
    }
}
