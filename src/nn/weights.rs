//! Weight import and export by name: torchvision state dicts from `.safetensors` or `.pth`
//! (torch's zip/pickle format) into a `VarMap`, and `VarMap` → `.safetensors` with the same names,
//! so PyTorch can `load_state_dict` what we save.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::encoder::Arch;
use super::error::{NnError, Result};

/// How to match checkpoint tensors to model variables.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Leave the model's `fc.*` as initialised and ignore the checkpoint's (a new head).
    pub ignore_fc: bool,
    /// Fail when the checkpoint lacks a model variable or has a tensor the model does not use
    /// (like PyTorch's `load_state_dict(strict=True)`). Shape mismatches always fail.
    pub strict: bool,
    /// Only model variables whose name starts with this prefix are loaded, and the prefix is
    /// removed to get the checkpoint name (e.g. "encoder." for an encoder inside a bigger model).
    pub prefix: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { ignore_fc: false, strict: true, prefix: String::new() }
    }
}

/// What a load did, by checkpoint name (sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Model variables left as initialised because the checkpoint lacks them (non-strict only).
    pub missing: Vec<String>,
    /// Checkpoint tensors not used (non-strict only; `fc.*` with `ignore_fc` are in `ignored`).
    pub unexpected: Vec<String>,
    pub ignored: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NnError + '_ {
    move |source| NnError::Io { path: path.to_path_buf(), source }
}

fn bad(path: &Path, msg: impl Into<String>) -> NnError {
    NnError::BadWeightsFile { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads every tensor of a `.safetensors` or `.pth` file (told apart by content, not by name)
/// onto the CPU. A `.pth` may hold the state dict itself or a dict with it under "state_dict" or
/// "model"; a leading "module." (from DataParallel) is removed from every name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let n = file.read(&mut magic).map_err(io_err(path))?;
    drop(file);
    let tensors: Vec<(String, Tensor)> = if n == 4 && magic == LEGACY_PTH_MAGIC[..4] {
        read_legacy_pth(path)?
    } else if n == 4 && magic == *b"PK\x03\x04" {
        let mut found = Vec::new();
        for key in [None, Some("state_dict"), Some("model")] {
            found = candle_core::pickle::read_all_with_key(path, key)
                .map_err(|e| bad(path, format!("cannot read this PyTorch .pth file: {e}")))?;
            if !found.is_empty() {
                break;
            }
        }
        if found.is_empty() {
            return Err(bad(path, "no tensors found in this .pth; save it with torch.save(model.state_dict(), path)"));
        }
        found
    } else {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(path, format!("neither a PyTorch .pth nor a readable .safetensors file: {e}")))?;
        map.into_iter().collect()
    };
    let strip = !tensors.is_empty() && tensors.iter().all(|(k, _)| k.starts_with("module."));
    Ok(tensors
        .into_iter()
        .map(|(k, v)| {
            let k = if strip { k["module.".len()..].to_string() } else { k };
            (k, v)
        })
        .collect())
}

/// The first bytes of a `.pth` in torch's legacy (pre-1.6, non-zip) format: pickle protocol 2, then the
/// magic number 0x1950a86a20f9469cfc6c as a 10-byte LONG1, then STOP.
const LEGACY_PTH_MAGIC: [u8; 15] = *b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// Reads a state dict saved by `torch.save` before torch 1.6 (or with `_use_new_zipfile_serialization=False`):
/// the ImageNet EfficientNet weights efficientnet_pytorch downloads (2019) are in this format. The file is
/// five pickles in a row (magic number, protocol version, system info, the state dict whose tensors refer to
/// storages by key, the list of storage keys) followed by each storage as an 8-byte little-endian element
/// count and its raw little-endian data, in the order of that list.
fn read_legacy_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    use candle_core::pickle::{Object, Stack};
    use std::io::Read;
    let truncated = |what: &str| bad(path, format!("truncated legacy .pth file ({what}); download it again"));
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut r = std::io::BufReader::new(file);
    let mut head = [0u8; LEGACY_PTH_MAGIC.len()];
    r.read_exact(&mut head).map_err(|_| truncated("header"))?;
    if head != LEGACY_PTH_MAGIC {
        return Err(bad(path, "not a PyTorch .pth file (the legacy format's magic number is missing)"));
    }
    let next_pickle = |r: &mut std::io::BufReader<std::fs::File>, what: &str| -> Result<Object> {
        let mut stack = Stack::empty();
        stack.read_loop(r).map_err(|e| bad(path, format!("cannot read the {what} of this legacy .pth file: {e}")))?;
        stack.finalize().map_err(|e| bad(path, format!("cannot read the {what} of this legacy .pth file: {e}")))
    };
    match next_pickle(&mut r, "protocol version")? {
        Object::Int(1001) | Object::Long(1001) => {}
        other => return Err(bad(path, format!("unsupported legacy .pth protocol version {other:?} (expected 1001)"))),
    }
    next_pickle(&mut r, "system info")?;
    let mut obj = next_pickle(&mut r, "state dict")?;
    let keys = next_pickle(&mut r, "storage list")?;
    // A checkpoint that wraps the state dict (`{"state_dict": ...}` or `{"model": ...}`).
    if let Object::Dict(entries) = &obj {
        let wrapped = entries.iter().find_map(|(k, v)| match k {
            Object::Unicode(k) if (k == "state_dict" || k == "model") && matches!(v, Object::Dict(_)) => {
                Some(v.clone())
            }
            _ => None,
        });
        if let Some(inner) = wrapped {
            obj = inner;
        }
    }
    let Object::Dict(entries) = obj else {
        return Err(bad(
            path,
            "this legacy .pth holds no state dict; save it with torch.save(model.state_dict(), path)",
        ));
    };
    let keys: Vec<String> = match keys {
        Object::List(keys) | Object::Tuple(keys) => keys.into_iter().filter_map(|k| k.unicode().ok()).collect(),
        _ => return Err(bad(path, "the storage list of this legacy .pth is not a list")),
    };
    let infos: Vec<candle_core::pickle::TensorInfo> = entries
        .into_iter()
        .filter_map(|(name, value)| value.into_tensor_info(name, Path::new("")).transpose())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(path, format!("cannot read a tensor record of this legacy .pth: {e}")))?;
    let dtype_of: HashMap<&str, candle_core::DType> =
        infos.iter().map(|i| (i.path.trim_start_matches('/'), i.dtype)).collect();
    // The storages, in the order of the key list; a storage no tensor uses is skipped over.
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    for key in &keys {
        let mut count = [0u8; 8];
        r.read_exact(&mut count).map_err(|_| truncated("storage size"))?;
        let count = u64::from_le_bytes(count) as usize;
        let Some(&dtype) = dtype_of.get(key.as_str()) else {
            return Err(bad(path, format!("storage '{key}' is used by no tensor; cannot tell its element size")));
        };
        let mut bytes = vec![0u8; count * dtype.size_in_bytes()];
        r.read_exact(&mut bytes).map_err(|_| truncated("storage data"))?;
        let t = Tensor::from_raw_buffer(&bytes, dtype, &[count], &Device::Cpu)
            .map_err(|e| bad(path, format!("storage '{key}': {e}")))?;
        storages.insert(key.clone(), t);
    }
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let key = info.path.trim_start_matches('/');
        let storage = storages
            .get(key)
            .ok_or_else(|| bad(path, format!("tensor '{}': storage '{key}' is missing", info.name)))?;
        let shape = info.layout.shape().clone();
        let start = info.layout.start_offset() / info.dtype.size_in_bytes();
        if !info.layout.is_contiguous() {
            return Err(bad(
                path,
                format!("tensor '{}' is stored non-contiguously; re-save it with a recent torch", info.name),
            ));
        }
        if start + shape.elem_count() > storage.dim(0).unwrap_or(0) {
            return Err(bad(path, format!("tensor '{}' reaches past the end of its storage", info.name)));
        }
        let t = storage.narrow(0, start, shape.elem_count()).and_then(|t| t.reshape(shape)).map_err(NnError::from)?;
        out.push((info.name, t));
    }
    Ok(out)
}

/// Guesses the encoder from state-dict names: `efficientnet_pytorch`'s `_conv_stem` (EfficientNet-b2,
/// the one EfficientNet supported: a b1 file has the same names and fails on shapes), else the
/// torchvision ResNet depth (blocks per layer, and whether blocks have a `conv3`). None when the names
/// look like neither.
pub fn detect_arch<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Arch> {
    let mut blocks = [0usize; 4];
    let mut bottleneck = false;
    let mut any = false;
    for name in names {
        if name.starts_with("_conv_stem.") {
            return Some(Arch::EfficientNetB2);
        }
        let mut parts = name.split('.');
        let (Some(layer), Some(idx), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(l) = layer.strip_prefix("layer").and_then(|l| l.parse::<usize>().ok()) else {
            continue;
        };
        let Ok(i) = idx.parse::<usize>() else {
            continue;
        };
        if (1..=4).contains(&l) {
            any = true;
            blocks[l - 1] = blocks[l - 1].max(i + 1);
            bottleneck |= rest == "conv3";
        }
    }
    if !any {
        return None;
    }
    Arch::ALL.into_iter().find(|a| a.resnet_layers() == Some(blocks) && a.bottleneck() == bottleneck)
}

fn examples(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > 5 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// A classifier tensor: torchvision's `fc.*` or `efficientnet_pytorch`'s `_fc.*`.
fn is_fc(name: &str) -> bool {
    name.starts_with("fc.") || name.starts_with("_fc.")
}

/// Loads a torchvision-named checkpoint into the variables of `varmap` (which the model's
/// constructor filled), strictly, with no prefix. `ignore_fc` keeps the model's own head.
pub fn load_into(varmap: &VarMap, path: &Path, ignore_fc: bool) -> Result<LoadReport> {
    let opts = LoadOptions { ignore_fc, ..LoadOptions::default() };
    load_into_with(varmap, path, &opts)
}

/// Loads with explicit options. All checks run before any variable is written, so a failed load
/// leaves the model as it was.
pub fn load_into_with(varmap: &VarMap, path: &Path, opts: &LoadOptions) -> Result<LoadReport> {
    let file = read_tensors(path)?;
    let vars: BTreeMap<String, Var> = {
        let data = varmap.data().lock().expect("VarMap mutex poisoned");
        data.iter()
            .filter_map(|(k, v)| k.strip_prefix(opts.prefix.as_str()).map(|k| (k.to_string(), v.clone())))
            .collect()
    };
    let file_arch = detect_arch(file.keys().map(String::as_str));
    let model_arch = detect_arch(vars.keys().map(String::as_str));
    let hint = match (file_arch, model_arch) {
        (Some(f), m) if Some(f) != m => format!("; these look like {f} weights; use --arch {f}"),
        _ => String::new(),
    };

    let mut report = LoadReport::default();
    let mut to_set = Vec::new();
    for (name, var) in &vars {
        if opts.ignore_fc && is_fc(name) {
            continue;
        }
        let Some(t) = file.get(name) else {
            report.missing.push(name.clone());
            continue;
        };
        if t.dims() != var.dims() {
            let hint = if hint.is_empty() && is_fc(name) {
                "; the checkpoint's classifier differs from the model's: ignore its fc (ignore_fc) to train a new head"
                    .to_string()
            } else {
                hint.clone()
            };
            return Err(NnError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
                hint,
            });
        }
        to_set.push((name.clone(), var.clone(), t.clone()));
    }
    for name in file.keys() {
        if opts.ignore_fc && is_fc(name) {
            report.ignored.push(name.clone());
        } else if !vars.contains_key(name) {
            report.unexpected.push(name.clone());
        }
    }
    // As PyTorch's BatchNorm does for checkpoints saved before `num_batches_tracked` existed (torch 0.4.1),
    // a missing counter is not an error: it stays 0 (it only matters for momentum=None, which no model uses).
    let missing: Vec<String> = report.missing.iter().filter(|n| !n.ends_with("num_batches_tracked")).cloned().collect();
    if opts.strict && !missing.is_empty() {
        return Err(NnError::MissingTensors {
            path: path.to_path_buf(),
            count: missing.len(),
            examples: examples(&missing),
            hint,
        });
    }
    if opts.strict && !report.unexpected.is_empty() {
        let hint = if hint.is_empty() && report.unexpected.iter().all(|n| is_fc(n)) {
            "; the model has no fc: ignore the checkpoint's fc (ignore_fc)".to_string()
        } else {
            hint
        };
        return Err(NnError::UnexpectedTensors {
            path: path.to_path_buf(),
            count: report.unexpected.len(),
            examples: examples(&report.unexpected),
            hint,
        });
    }
    for (name, var, t) in to_set {
        let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&t)?;
        report.loaded.push(name);
    }
    Ok(report)
}

/// Saves every variable of `varmap` to a `.safetensors` file under its own name.
pub fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    save_with(varmap, path, "")
}

/// Saves the variables whose name starts with `prefix`, with the prefix removed (e.g. the
/// encoder of a bigger model as a plain torchvision state dict). Written atomically
/// ([`crate::fsutil::write_atomic_with`]) and synced to disk before the rename, so `path` is never
/// half-written, not even after a power cut (a training checkpoint must survive the crash it is for).
pub fn save_with(varmap: &VarMap, path: &Path, prefix: &str) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().expect("VarMap mutex poisoned");
        data.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.as_tensor().to_device(&Device::Cpu))))
            .map(|(k, t)| t.map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?
    };
    if tensors.is_empty() {
        return Err(NnError::InvalidInput(format!(
            "nothing to save to {}: no variable starts with '{prefix}'",
            path.display()
        )));
    }
    // The same bytes `candle_core::safetensors::save` writes, serialised in memory (safetensors has no
    // writer-based API) so the file goes through the crate's one atomic write.
    let bytes = safetensors::tensor::serialize(&tensors, None).map_err(candle_core::Error::from)?;
    crate::fsutil::write_atomic_with(path, |f| {
        std::io::Write::write_all(f, &bytes)?;
        f.sync_all()
    })
    .map_err(io_err(path))
}

/// True for BatchNorm buffers (running statistics, batch counter), which are not trained.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked")
}

/// The trainable variables whose name starts with `prefix` (BatchNorm buffers excluded), sorted
/// by name so optimiser state lines up across runs.
pub fn trainable_vars(varmap: &VarMap, prefix: &str) -> Vec<Var> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let mut v: Vec<(&String, &Var)> = data.iter().filter(|(k, _)| k.starts_with(prefix) && !is_buffer(k)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, var)| var.clone()).collect()
}
