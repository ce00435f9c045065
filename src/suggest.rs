//! "Did you mean": the known name closest to a misspelt one.
//!
//! In: the name a config used and the names that would have been valid (keys of a table,
//! collections, columns). Out: the closest of them, if it is close enough to be the one
//! meant. Used by `check` for keys, sections, collections and fields.

/// Names at least this similar (Jaro-Winkler, 0..1) are suggested: it favours a shared
/// start, which is how names get misspelt (`stat` for `status`, `titel` for `title`).
const THRESHOLD: f64 = 0.8;

/// The candidate most like `name`, if any is close enough; never `name` itself.
pub fn closest<'a, S: AsRef<str> + ?Sized>(name: &str, candidates: &'a [&'a S]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| c.as_ref())
        .filter(|c| *c != name)
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= THRESHOLD)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_name_meant() {
        let cols = ["_id", "project_id", "title", "status", "meta"];
        assert_eq!(closest("stat", &cols), Some("status"));
        assert_eq!(closest("titel", &cols), Some("title"));
        assert_eq!(closest("projct_id", &cols), Some("project_id"));
        assert_eq!(closest("histroy", &["history", "server"]), Some("history"));
    }

    #[test]
    fn suggests_nothing_far_off_and_never_the_name_itself() {
        let cols = ["_id", "project_id", "title", "status"];
        assert_eq!(closest("colour", &cols), None);
        assert_eq!(closest("title", &["title"]), None);
    }
}
