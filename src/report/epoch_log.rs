//! Reading the per-epoch logs the trainers write (`metrics.jsonl` of fine-tuning: `train_loss`, `val_loss`,
//! `val_accuracy`, ...; the pretraining log: `loss`) into plot series.

use std::path::Path;

use super::error::{ReportError, Result};
use super::plot::Series;

/// One series per field, x = the line's `epoch`, in file order. Lines without the field (or with a non-number)
/// are left out of that series; a line that is not JSON is an error naming the line.
pub fn series_from_jsonl(path: &Path, fields: &[&str]) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(path).map_err(ReportError::io(path))?;
    let mut out: Vec<Series> = fields.iter().map(|f| (f.to_string(), Vec::new())).collect();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            ReportError::Input(format!("{}:{}: not a JSON line ({e}); is this an epoch log?", path.display(), i + 1))
        })?;
        let Some(epoch) = v.get("epoch").and_then(|e| e.as_f64()) else {
            return Err(ReportError::Input(format!("{}:{}: no \"epoch\" number", path.display(), i + 1)));
        };
        for (f, (_, pts)) in fields.iter().zip(out.iter_mut()) {
            if let Some(y) = v.get(*f).and_then(|y| y.as_f64()) {
                pts.push((epoch, y));
            }
        }
    }
    Ok(out)
}
