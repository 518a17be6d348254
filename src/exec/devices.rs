//! The device pool: which GPUs the scheduler hands out, one id per slot.

use crate::error::{Error, Result};

/// What `--devices` asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceSpec {
    /// Discover GPUs: `CUDA_VISIBLE_DEVICES`, else `nvidia-smi -L`.
    Auto,
    /// No GPUs: GPU nodes run on the CPU.
    Cpu,
    /// These GPU ids (`0,1` or `cuda:0,cuda:1`). The same id listed twice gives two slots on one GPU.
    List(Vec<String>),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" | "none" => Ok(DeviceSpec::Cpu),
            list => {
                let mut ids = Vec::new();
                for part in list.split(',').map(str::trim) {
                    let id = part.strip_prefix("cuda:").unwrap_or(part);
                    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        return Err(format!(
                            "`{part}` is not a device; use auto, cpu, or a list like 0,1 or cuda:0,cuda:1"
                        ));
                    }
                    ids.push(id.to_string());
                }
                Ok(DeviceSpec::List(ids))
            }
        }
    }
}

/// Resolves the spec to the GPU slots available to this run.
pub fn discover(spec: &DeviceSpec) -> Result<Vec<String>> {
    match spec {
        DeviceSpec::Cpu => Ok(Vec::new()),
        DeviceSpec::List(ids) => Ok(ids.clone()),
        DeviceSpec::Auto => {
            if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
                let v = v.trim();
                // "" and "-1" are how users hide every GPU.
                if v.is_empty() || v == "-1" {
                    return Ok(Vec::new());
                }
                return Ok(v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect());
            }
            Ok(nvidia_smi_ids())
        }
    }
}

/// GPU indices listed by `nvidia-smi -L` ("GPU 0: NVIDIA H100 (UUID: ...)"), or none if it is absent.
fn nvidia_smi_ids() -> Vec<String> {
    let Ok(out) = std::process::Command::new("nvidia-smi").arg("-L").output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nvidia_smi(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("GPU "))
        .filter_map(|rest| rest.split(':').next())
        .map(|id| id.trim().to_string())
        .collect()
}

/// Free/busy state of the slots.
pub struct Pool {
    ids: Vec<String>,
    free: Vec<bool>,
}

impl Pool {
    pub fn new(ids: Vec<String>) -> Pool {
        let free = vec![true; ids.len()];
        Pool { ids, free }
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn free_count(&self) -> usize {
        self.free.iter().filter(|f| **f).count()
    }
    /// Takes `n` free slots (lowest first); returns their indices.
    pub fn take(&mut self, n: usize) -> Option<Vec<usize>> {
        if self.free_count() < n {
            return None;
        }
        let picked: Vec<usize> = (0..self.ids.len()).filter(|&i| self.free[i]).take(n).collect();
        for &i in &picked {
            self.free[i] = false;
        }
        Some(picked)
    }
    pub fn give_back(&mut self, slots: &[usize]) {
        for &i in slots {
            self.free[i] = true;
        }
    }
    pub fn ids_of(&self, slots: &[usize]) -> Vec<String> {
        slots.iter().map(|&i| self.ids[i].clone()).collect()
    }
}

/// Checks that no stage asks for more GPUs than exist (when there are any at all).
pub fn check_demand(max_gpus: u32, pool: &Pool, stage: &str) -> Result<()> {
    if !pool.is_empty() && max_gpus as usize > pool.len() {
        return Err(Error::user(format!(
            "stage `{stage}` needs {max_gpus} GPUs but only {} device slot(s) are available ({}); lower `gpus` or pass --devices",
            pool.len(),
            pool.ids.join(",")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:0, cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::List(vec!["0".into(), "1".into()]));
        assert!("cuda:".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn parses_nvidia_smi_listing() {
        let text = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n";
        assert_eq!(parse_nvidia_smi(text), vec!["0", "1"]);
    }

    #[test]
    fn pool_hands_out_distinct_slots() {
        let mut p = Pool::new(vec!["0".into(), "1".into(), "2".into()]);
        let a = p.take(2).unwrap();
        assert_eq!(p.ids_of(&a), vec!["0", "1"]);
        assert!(p.take(2).is_none());
        let b = p.take(1).unwrap();
        assert_eq!(p.ids_of(&b), vec!["2"]);
        p.give_back(&a);
        assert_eq!(p.free_count(), 2);
    }
}
