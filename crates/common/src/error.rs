//! Printing an error with its causes.

/// An error and each of its causes once, on one line: `a: b: c`.
///
/// Errors in gpucell keep their cause as `source()` and do not repeat it in their own
/// message, so joining the chain says everything once. Works for `anyhow::Error` too:
/// `chain_string(&*err)` (or `err.as_ref()`).
pub fn chain_string(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: Middle,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("bad header")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn joins_every_cause_once() {
        let err = Outer {
            path: "/x",
            source: Middle(std::io::Error::other("short read")),
        };
        assert_eq!(chain_string(&err), "cannot read /x: bad header: short read");
        assert_eq!(chain_string(&err.source), "bad header: short read");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(chain_string(&io), "gone");
    }

    #[test]
    fn boxed_and_dyn_errors() {
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(Middle(std::io::Error::other("eof")));
        assert_eq!(chain_string(&*boxed), "bad header: eof");
    }
}
