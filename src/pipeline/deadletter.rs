//! Dead letters: input that cannot be processed is counted by reason, logged once per reason
//! (then at debug level), and appended as a JSON line to a file when one is configured. Its
//! offset is acknowledged like any other: one bad alert never stops the stream.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;
use crate::pipeline::AckToken;

pub struct DeadLetterSink {
    file: Option<Mutex<std::fs::File>>,
    metrics: Arc<Metrics>,
}

impl DeadLetterSink {
    pub fn open(path: Option<&Path>, metrics: Arc<Metrics>) -> std::io::Result<DeadLetterSink> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("dead-letter file {}: {e}", p.display()))
                })?,
            )),
            None => None,
        };
        Ok(DeadLetterSink { file, metrics })
    }

    pub fn deliver(&self, token: &AckToken, reason: &str, error: &str) {
        let n = self.metrics.add_dead_letter(reason);
        if n == 1 {
            tracing::warn!(
                reason,
                topic = %token.topic,
                partition = token.partition,
                offset = token.offset,
                %error,
                "dead letter (first of this reason; later ones are logged at debug level)"
            );
        } else {
            tracing::debug!(reason, offset = token.offset, %error, "dead letter");
        }
        if let Some(file) = &self.file {
            let line = serde_json::json!({
                "reason": reason,
                "topic": token.topic,
                "partition": token.partition,
                "offset": token.offset,
                "error": error,
            });
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = writeln!(f, "{line}") {
                tracing::error!(error = %e, "cannot write the dead-letter file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_counted_and_written_as_json_lines() {
        let path = std::env::temp_dir().join(format!("blink-dl-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let metrics = Arc::new(Metrics::default());
        let sink = DeadLetterSink::open(Some(&path), metrics.clone()).unwrap();
        let tok = |offset| AckToken { topic: "alerts".into(), partition: 3, offset };
        sink.deliver(&tok(7), "gzip_bomb", "stamp inflates past 4194304 bytes");
        sink.deliver(&tok(8), "empty", "empty message (0 bytes)");
        sink.deliver(&tok(9), "empty", "empty message (0 bytes)");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["reason"], "gzip_bomb");
        assert_eq!(lines[0]["partition"], 3);
        assert_eq!(lines[2]["offset"], 9);
        assert_eq!(metrics.dead_letters().get("empty"), Some(&2));
        assert_eq!(metrics.dead_letter_total(), 3);
        std::fs::remove_file(&path).unwrap();

        let err = DeadLetterSink::open(Some(Path::new("/nonexistent-dir/x.jsonl")), metrics).err().unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/x.jsonl"), "{err}");
    }
}
