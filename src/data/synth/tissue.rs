//! Tissue architectures (what differs between classes and subtypes) and stains (what differs
//! between patients and labs). Numbers are in micrometres and optical density (OD).
//!
//! Malignant presets have more, larger, darker, more variable and more irregular nuclei and
//! less orderly glands than benign ones, so a classifier can learn the label from the pixels.

use super::rng::Rng;

/// What fills the centre of a gland.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Lumen {
    /// Empty (white) lumen: normal ducts, adenosis, tubules.
    Clear,
    /// Lumen filled with tumour cells (carcinoma in situ).
    Filled,
    /// Fibrovascular stromal core: papillary fronds, floating in empty space.
    Core,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Arch {
    /// Fraction of the plane covered by tissue (the rest is white background / holes).
    pub tissue: f32,
    /// Eosin OD of stroma (collagen): high = dense pink, low = loose or empty.
    pub stroma_e: f32,
    /// Amplitude of the fibre texture of stroma.
    pub fiber: f32,
    /// Stromal (fibroblast) nuclei: acceptance per 12 µm slot.
    pub stroma_cells: f32,
    /// Length/width of stromal nuclei.
    pub spindle: f32,
    /// Gland grid spacing (µm); glands are at most about half of it across. 0 = no glands.
    pub gland_spacing: f32,
    pub gland_prob: f32,
    /// Mean gland semi-axis (µm) and its relative spread.
    pub gland_radius: f32,
    pub gland_radius_sd: f32,
    /// Largest elongation of a gland (1 = round).
    pub gland_aspect: f32,
    /// Lumen radius as a fraction of the gland radius.
    pub lumen: f32,
    pub lumen_kind: Lumen,
    /// Rows of nuclei lining a gland.
    pub rim_rows: u32,
    /// Fraction of tissue covered by solid epithelial sheets, and how densely they hold nuclei.
    pub sheet: f32,
    pub sheet_density: f32,
    /// Single-file strands of cells (lobular carcinoma): expected strands per 60 µm cell.
    pub strands: f32,
    /// Fraction of tissue covered by mucin pools with floating cell clusters (mucinous carcinoma).
    pub mucin: f32,
    /// Epithelial nuclei: mean radius (µm), relative spread, extra elongation, contour
    /// irregularity, hematoxylin OD (hyperchromasia) and chromatin coarseness.
    pub nuc_r: f32,
    pub nuc_r_sd: f32,
    pub nuc_aspect: f32,
    pub nuc_irreg: f32,
    pub nuc_h: f32,
    pub chromatin: f32,
    /// Lymphocytes: acceptance per 20 µm slot.
    pub lymph: f32,
}

/// A plain benign baseline that presets adjust.
fn base() -> Arch {
    Arch {
        tissue: 0.8,
        stroma_e: 0.65,
        fiber: 0.4,
        stroma_cells: 0.12,
        spindle: 3.0,
        gland_spacing: 0.0,
        gland_prob: 0.0,
        gland_radius: 30.0,
        gland_radius_sd: 0.15,
        gland_aspect: 1.3,
        lumen: 0.45,
        lumen_kind: Lumen::Clear,
        rim_rows: 1,
        sheet: 0.0,
        sheet_density: 0.0,
        strands: 0.0,
        mucin: 0.0,
        nuc_r: 3.0,
        nuc_r_sd: 0.08,
        nuc_aspect: 0.15,
        nuc_irreg: 0.03,
        nuc_h: 1.05,
        chromatin: 0.1,
        lymph: 0.02,
    }
}

/// Malignant nuclear features shared by the carcinomas.
fn malignant_nuclei(a: Arch) -> Arch {
    Arch {
        nuc_r: 4.6,
        nuc_r_sd: 0.28,
        nuc_aspect: 0.3,
        nuc_irreg: 0.14,
        nuc_h: 1.7,
        chromatin: 0.45,
        // Desmoplastic, inflamed stroma around carcinoma.
        stroma_cells: a.stroma_cells.max(0.2),
        lymph: a.lymph.max(0.08),
        ..a
    }
}

/// BreakHis subtype presets, by code.
pub(crate) fn breakhis(code: &str) -> Arch {
    let b = base();
    match code {
        // Adenosis: many small crowded round glands with clear lumens.
        "A" => Arch {
            gland_spacing: 52.0,
            gland_prob: 0.85,
            gland_radius: 15.0,
            gland_radius_sd: 0.25,
            lumen: 0.35,
            rim_rows: 2,
            ..b
        },
        // Fibroadenoma: abundant loose stroma, compressed slit-like glands.
        "F" => Arch {
            stroma_e: 0.5,
            fiber: 0.55,
            stroma_cells: 0.18,
            gland_spacing: 110.0,
            gland_prob: 0.6,
            gland_radius: 34.0,
            gland_radius_sd: 0.3,
            gland_aspect: 3.5,
            lumen: 0.3,
            ..b
        },
        // Phyllodes tumour: hypercellular leaf-like stroma with clefts.
        "PT" => Arch {
            stroma_e: 0.7,
            stroma_cells: 0.45,
            spindle: 3.5,
            gland_spacing: 110.0,
            gland_prob: 0.5,
            gland_radius: 45.0,
            gland_aspect: 4.0,
            lumen: 0.5,
            ..b
        },
        // Tubular adenoma: closely packed small uniform tubules, little stroma.
        "TA" => Arch {
            stroma_e: 0.55,
            gland_spacing: 36.0,
            gland_prob: 0.95,
            gland_radius: 12.0,
            gland_radius_sd: 0.12,
            lumen: 0.3,
            ..b
        },
        // Ductal carcinoma: solid sheets and nests of pleomorphic cells, few glands.
        "DC" => malignant_nuclei(Arch {
            sheet: 0.7,
            sheet_density: 0.9,
            gland_spacing: 120.0,
            gland_prob: 0.25,
            gland_radius: 40.0,
            gland_radius_sd: 0.35,
            gland_aspect: 1.8,
            lumen: 0.35,
            rim_rows: 3,
            lymph: 0.06,
            ..b
        }),
        // Mucinous carcinoma: pools of pale mucin with floating clusters of tumour cells.
        "MC" => malignant_nuclei(Arch { mucin: 0.5, sheet: 0.3, sheet_density: 0.85, nuc_r: 4.2, ..b }),
        // Lobular carcinoma: single files of small, discohesive, uniform-ish cells in stroma.
        "LC" => Arch {
            strands: 3.5,
            sheet: 0.3,
            sheet_density: 0.7,
            stroma_cells: 0.2,
            ..malignant_nuclei(Arch { nuc_r_sd: 0.15, ..b })
        },
        // Papillary carcinoma: finger-like fronds with stromal cores lined by stratified cells.
        "PC" => malignant_nuclei(Arch {
            stroma_e: 0.15,
            fiber: 0.15,
            stroma_cells: 0.03,
            gland_spacing: 90.0,
            gland_prob: 0.9,
            gland_radius: 40.0,
            gland_aspect: 3.0,
            lumen: 0.5,
            lumen_kind: Lumen::Core,
            rim_rows: 3,
            ..b
        }),
        _ => b,
    }
}

/// BACH class presets, by label (benign 0, invasive 1, insitu 2, normal 3).
pub(crate) fn bach(label: u32) -> Arch {
    match label {
        0 => breakhis("F"),
        1 => breakhis("DC"),
        2 => malignant_nuclei(Arch {
            gland_spacing: 160.0,
            gland_prob: 0.8,
            gland_radius: 65.0,
            lumen: 0.85,
            lumen_kind: Lumen::Filled,
            rim_rows: 2,
            ..base()
        }),
        _ => Arch {
            tissue: 0.6,
            stroma_e: 0.55,
            gland_spacing: 50.0,
            gland_prob: 0.45,
            gland_radius: 16.0,
            lumen: 0.4,
            ..base()
        },
    }
}

/// Breast cell (UCSB) presets: benign 0, malignant 1.
pub(crate) fn breast_cell(label: u32) -> Arch {
    if label == 0 {
        breakhis("A")
    } else {
        breakhis("DC")
    }
}

impl Arch {
    /// A patient's own version of its class: every patient's lesion differs a little.
    pub(crate) fn jittered(&self, rng: &mut Rng) -> Arch {
        let mut j = |v: f32, rel: f32| v * (1.0 + rel * rng.range(-1.0, 1.0));
        Arch {
            tissue: j(self.tissue, 0.08).min(0.95),
            stroma_e: j(self.stroma_e, 0.12),
            stroma_cells: j(self.stroma_cells, 0.2),
            gland_prob: j(self.gland_prob, 0.1).min(1.0),
            gland_radius: j(self.gland_radius, 0.12),
            sheet: j(self.sheet, 0.15).min(0.9),
            sheet_density: j(self.sheet_density, 0.08).min(1.0),
            strands: j(self.strands, 0.15),
            mucin: j(self.mucin, 0.12).min(0.9),
            nuc_r: j(self.nuc_r, 0.08),
            nuc_h: j(self.nuc_h, 0.08),
            ..self.clone()
        }
    }
}

/// A stain: Beer–Lambert optical-density vectors of hematoxylin and eosin, their strengths,
/// and the background cast. Varies per patient (or per batch), as in real labs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stain {
    pub h: [f32; 3],
    pub e: [f32; 3],
    pub h_scale: f32,
    pub e_scale: f32,
    pub bg: [f32; 3],
}

fn normalised(v: [f32; 3]) -> [f32; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-6);
    [v[0] / n, v[1] / n, v[2] / n]
}

impl Stain {
    /// The standard (Ruifrok–Johnston) H&E vectors, with a random perturbation.
    pub(crate) fn random(rng: &mut Rng) -> Stain {
        let mut perturb = |v: [f32; 3], a: f32| {
            normalised([
                (v[0] + rng.range(-a, a)).max(0.02),
                (v[1] + rng.range(-a, a)).max(0.02),
                (v[2] + rng.range(-a, a)).max(0.02),
            ])
        };
        let h = perturb([0.650, 0.704, 0.286], 0.12);
        // Eosin as measured on real BreakHis stroma (pinker than the textbook [0.07, 0.99, 0.11]).
        let e = perturb([0.16, 0.93, 0.33], 0.10);
        Stain {
            h,
            e,
            h_scale: rng.range(0.8, 1.25),
            e_scale: rng.range(0.7, 1.3),
            bg: [rng.range(0.0, 0.07), rng.range(0.0, 0.07), rng.range(0.0, 0.07)],
        }
    }

    /// A small per-image variation of this stain (section thickness, illumination).
    pub(crate) fn varied(&self, rng: &mut Rng) -> Stain {
        Stain {
            h_scale: self.h_scale * rng.range(0.93, 1.07),
            e_scale: self.e_scale * rng.range(0.93, 1.07),
            ..self.clone()
        }
    }
}
