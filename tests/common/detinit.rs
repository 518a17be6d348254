//! `det_init`: deterministic model weights, bit for bit the values of scripts/nn/detinit.py, so golden files
//! made by PyTorch need no committed weight file. Shared by tests/nn.rs and tests/infer.rs.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

pub fn fnv1a(name: &str) -> u32 {
    let mut h: u32 = 0x811C9DC5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

pub fn det_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let seed = fnv1a(name);
    let c_w = |fan_in: usize| ((6.0f64 / fan_in as f64).sqrt() / 1000.0) as f32;
    (0..n)
        .map(|i| {
            let mut h = seed ^ (i as u32).wrapping_mul(0x9E3779B1);
            h ^= h >> 16;
            h = h.wrapping_mul(0x85EBCA6B);
            h ^= h >> 13;
            h = h.wrapping_mul(0xC2B2AE35);
            h ^= h >> 16;
            let u = ((h % 2001) as i32 - 1000) as f32;
            match shape.len() {
                2 | 4 => u * c_w(shape[1..].iter().product()),
                _ if name.ends_with("running_var") => (u + 1000.0) * ((0.25f64 / 1000.0) as f32) + 1.0,
                _ if name.ends_with("weight") => u * ((0.1f64 / 1000.0) as f32) + 1.0,
                _ => u * ((0.1f64 / 1000.0) as f32),
            }
        })
        .collect()
}

pub fn det_init(varmap: &VarMap) {
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        if var.dtype() != DType::F32 {
            continue;
        }
        let v = det_values(name, var.dims());
        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}
