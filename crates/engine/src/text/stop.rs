//! Stop sequences: output is held back while it could still be the start of one.

/// Holds back output text that could be the start of a stop sequence.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    /// Returns the text safe to emit, and whether a stop sequence matched
    /// (the stop sequence itself and anything after it are dropped).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop sequence.
        let mut keep = 0;
        for s in &self.stops {
            if let Some(i) = (1..s.len()).rev().find(|&i| s.is_char_boundary(i) && self.held.ends_with(&s[..i])) {
                keep = keep.max(i);
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abE"), ("ab".into(), false));
        assert_eq!(m.push("N"), ("".into(), false));
        assert_eq!(m.push("Dx"), ("".into(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), ("".into(), false));
        assert_eq!(m.push("o"), ("ENo".into(), false));
        assert_eq!(m.push("E"), ("".into(), false));
        assert_eq!(m.flush(), "E");
    }
}
