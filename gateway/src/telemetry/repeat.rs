//! Holding back repeated log lines, so a failure that recurs every second
//! is logged once a window with the count of the lines held back.

/// Holds back repeats of the same log line: the first occurrence of a
/// cause is logged, later ones within `window` are only counted, and the
/// next line logged for that cause carries the count. Bounded in memory.
#[derive(Debug)]
pub struct RepeatLog {
    window: std::time::Duration,
    causes: std::collections::HashMap<String, (std::time::Instant, u64)>,
}

impl RepeatLog {
    /// Most distinct causes remembered.
    const MAX_CAUSES: usize = 64;

    /// A limiter logging each cause at most once per `window`.
    pub fn new(window: std::time::Duration) -> Self {
        RepeatLog {
            window,
            causes: std::collections::HashMap::new(),
        }
    }

    /// `Some(n)` when a line for `cause` should be logged now, `n` being the
    /// repeats held back since the last one; `None` to hold this one back.
    pub fn should_log(&mut self, cause: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        if let Some((at, held)) = self.causes.get_mut(cause) {
            if now.duration_since(*at) < self.window {
                *held += 1;
                return None;
            }
            let n = *held;
            *at = now;
            *held = 0;
            return Some(n);
        }
        if self.causes.len() >= Self::MAX_CAUSES {
            let window = self.window;
            self.causes
                .retain(|_, (at, _)| now.duration_since(*at) < window);
            if self.causes.len() >= Self::MAX_CAUSES {
                self.causes.clear();
            }
        }
        self.causes.insert(cause.to_owned(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted() {
        let mut r = RepeatLog::new(std::time::Duration::from_secs(3600));
        assert_eq!(r.should_log("a"), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.should_log("a"), None);
        }
        assert_eq!(r.should_log("b"), Some(0));
        let mut r = RepeatLog::new(std::time::Duration::ZERO);
        assert_eq!(r.should_log("a"), Some(0));
        assert_eq!(r.should_log("a"), Some(0));
    }
}
