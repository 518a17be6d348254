//! Rendering a view of a procedural tissue field.
//!
//! The field is continuous and infinite (world units: µm): tissue/background, epithelial sheets,
//! mucin pools and stroma tone are band-limited noise; glands, strands and nuclei are objects
//! drawn from hashed grid cells, so any window can be generated without the rest of the world.
//! A view is (centre, µm per pixel, width, height): the four BreakHis magnifications of one region
//! are four views with the same centre and µm/px in ratio 10 : 4 : 2 : 1.

use image::RgbImage;

use super::noise::{fbm, smoothstep, threshold_for, value};
use super::rng::{hash, hash_cell, mix, unit, Rng};
use super::tissue::{Arch, Lumen, Stain};

/// A patient's (or image's) tissue: its architecture, stain and random world.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub seed: u64,
    pub arch: Arch,
    pub stain: Stain,
}

/// A window onto a field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub cx: f64,
    pub cy: f64,
    pub um_per_px: f64,
    pub width: u32,
    pub height: u32,
    /// Seed of the per-image sensor grain (different per image, same field).
    pub grain_seed: u64,
}

// Seeds of the field's noise layers.
const TISSUE: u64 = 1;
const SHEET: u64 = 2;
const MUCIN: u64 = 3;
const TONE: u64 = 4;
const CLUSTER: u64 = 5;
const FIBER: u64 = 6;
const GLANDS: u64 = 7;
const SLOTS: u64 = 8;
const STRANDS: u64 = 9;
const STROMA: u64 = 10;
const LYMPH: u64 = 11;

/// Eosin / hematoxylin OD of epithelial cytoplasm, mucin and lumen.
const CYTO: (f32, f32) = (0.45, 0.14);
const MUCIN_OD: (f32, f32) = (0.05, 0.16);
const LUMEN_OD: (f32, f32) = (0.03, 0.01);

impl Field {
    fn layer(&self, which: u64) -> u64 {
        hash(self.seed, &[which])
    }

    /// Tissue presence in [0, 1] at a point (band-limited at `min_wl`).
    pub(crate) fn tissue(&self, x: f64, y: f64, min_wl: f64) -> f32 {
        let t = threshold_for(self.arch.tissue);
        smoothstep(t - 0.03, t + 0.03, fbm(self.layer(TISSUE), x, y, 900.0, 4, min_wl))
    }
    fn sheet(&self, x: f64, y: f64, min_wl: f64) -> f32 {
        if self.arch.sheet <= 0.0 {
            return 0.0;
        }
        let t = threshold_for(self.arch.sheet);
        smoothstep(t - 0.03, t + 0.03, fbm(self.layer(SHEET), x, y, 160.0, 4, min_wl))
    }
    fn mucin(&self, x: f64, y: f64, min_wl: f64) -> f32 {
        if self.arch.mucin <= 0.0 {
            return 0.0;
        }
        let t = threshold_for(self.arch.mucin);
        smoothstep(t - 0.03, t + 0.03, fbm(self.layer(MUCIN), x, y, 260.0, 3, min_wl))
    }
    /// Floating cell clusters inside mucin.
    fn cluster(&self, x: f64, y: f64, min_wl: f64) -> f32 {
        smoothstep(0.5, 0.56, fbm(self.layer(CLUSTER), x, y, 45.0, 2, min_wl))
    }

    /// Collagen fibres run along a per-field direction and bend: the stripe pattern is
    /// evaluated at (u, v − warp(x, y)) in fibre coordinates, with a smooth warp of ±40 µm over
    /// ~300 µm. Warping world-fixed coordinates (rather than rotating them by a varying angle)
    /// keeps the texture identical in every view of the same place.
    fn fibre_base(&self) -> (f64, f64) {
        let a = unit(mix(self.layer(FIBER))) as f64 * std::f64::consts::PI;
        (a.cos(), a.sin())
    }
    fn fibre_warp(&self, x: f64, y: f64) -> f32 {
        80.0 * (fbm(self.layer(FIBER) ^ 1, x, y, 300.0, 2, 0.0) - 0.5)
    }
    /// Local fibre direction (for fibroblasts): the base angle plus the warp's slope.
    fn fibre_angle(&self, x: f64, y: f64) -> f32 {
        let (c, s) = self.fibre_base();
        let slope = self.fibre_warp(x + c, y + s) - self.fibre_warp(x, y);
        s.atan2(c) as f32 + slope.atan()
    }

    /// How much a point shows the lesion: pathologists photographed the lesion, not the
    /// surrounding normal stroma.
    fn lesion_score(&self, x: f64, y: f64) -> f32 {
        let mut s = self.tissue(x, y, 0.0);
        if self.arch.sheet > 0.0 && self.arch.mucin <= 0.0 {
            s *= 0.3 + 0.7 * self.sheet(x, y, 0.0);
        }
        if self.arch.mucin > 0.0 {
            let m = self.mucin(x, y, 0.0);
            s *= 0.3 + 0.7 * m * self.cluster(x, y, 0.0);
        }
        s
    }

    /// A point well inside the lesion for region `tag`, so even the 400X view shows it.
    pub(crate) fn region_centre(&self, tag: u64) -> (f64, f64) {
        let mut rng = Rng::new(hash(self.seed, &[0xCE47, tag]));
        let mut best = (0.0, 0.0, -1.0f32);
        for _ in 0..64 {
            let x = rng.range(0.0, 400_000.0) as f64;
            let y = rng.range(0.0, 400_000.0) as f64;
            let t = self.lesion_score(x, y);
            if t > best.2 {
                best = (x, y, t);
            }
            if t >= 0.999 {
                break;
            }
        }
        (best.0, best.1)
    }
}

/// One nucleus, in world units.
struct Nucleus {
    x: f64,
    y: f64,
    /// Semi-axes (µm) and orientation.
    a: f32,
    b: f32,
    angle: f32,
    /// Contour harmonics (3-fold and 2-fold wobble).
    w3c: f32,
    w3s: f32,
    w4: f32,
    /// Hematoxylin OD and chromatin coarseness.
    h: f32,
    chromatin: f32,
    seed: u64,
}

fn epithelial(arch: &Arch, x: f64, y: f64, angle: f32, rng: &mut Rng) -> Nucleus {
    let r = arch.nuc_r * (1.0 + arch.nuc_r_sd * rng.normal()).clamp(0.5, 2.2);
    let elong = 1.0 + arch.nuc_aspect * rng.f32() * 2.0;
    let irr = arch.nuc_irreg;
    Nucleus {
        x,
        y,
        a: r * elong.sqrt(),
        b: r / elong.sqrt(),
        angle,
        w3c: irr * rng.range(-1.0, 1.0),
        w3s: irr * rng.range(-1.0, 1.0),
        w4: irr * rng.range(-0.7, 0.7),
        h: arch.nuc_h * rng.range(0.85, 1.15),
        chromatin: arch.chromatin,
        seed: rng.next_u64(),
    }
}

/// The pixel buffers of a view: eosin and hematoxylin OD per pixel.
struct Canvas {
    w: usize,
    h: usize,
    x0: f64,
    y0: f64,
    upp: f64,
    eo: Vec<f32>,
    he: Vec<f32>,
}

impl Canvas {
    /// World → pixel coordinates (pixel centres at +0.5).
    fn to_px(&self, x: f64, y: f64) -> (f32, f32) {
        (((x - self.x0) / self.upp) as f32, ((y - self.y0) / self.upp) as f32)
    }
    fn world(&self, px: f32, py: f32) -> (f64, f64) {
        (self.x0 + px as f64 * self.upp, self.y0 + py as f64 * self.upp)
    }
    /// Whether a disc of radius `r` µm around (x, y) touches the view.
    fn touches(&self, x: f64, y: f64, r: f64) -> bool {
        x + r >= self.x0
            && y + r >= self.y0
            && x - r <= self.x0 + self.w as f64 * self.upp
            && y - r <= self.y0 + self.h as f64 * self.upp
    }

    /// Paints an ellipse (gland): `paint(canvas, pixel index, rho, alpha)` with `rho` the
    /// normalised radius (1 at the rim) and `alpha` the anti-aliased coverage.
    fn ellipse(
        &mut self,
        x: f64,
        y: f64,
        a: f32,
        b: f32,
        angle: f32,
        mut paint: impl FnMut(&mut Canvas, usize, f32, f32),
    ) {
        let (px, py) = self.to_px(x, y);
        let ap = a / self.upp as f32;
        let bp = b / self.upp as f32;
        let reach = ap.max(bp) + 1.5;
        let (c, s) = (angle.cos(), angle.sin());
        let x_lo = ((px - reach).floor().max(0.0)) as usize;
        let x_hi = ((px + reach).ceil().min(self.w as f32)) as usize;
        let y_lo = ((py - reach).floor().max(0.0)) as usize;
        let y_hi = ((py + reach).ceil().min(self.h as f32)) as usize;
        for j in y_lo..y_hi {
            let dy = j as f32 + 0.5 - py;
            for i in x_lo..x_hi {
                let dx = i as f32 + 0.5 - px;
                let u = (dx * c + dy * s) / ap;
                let v = (-dx * s + dy * c) / bp;
                let rho = (u * u + v * v).sqrt();
                // Signed distance to the rim in pixels (approximate), for anti-aliasing.
                let alpha = ((1.0 - rho) * bp + 0.5).clamp(0.0, 1.0);
                if alpha > 0.0 {
                    paint(self, j * self.w + i, rho, alpha);
                }
            }
        }
    }

    fn nucleus(&mut self, n: &Nucleus) {
        let (px, py) = self.to_px(n.x, n.y);
        let upp = self.upp as f32;
        let ap = n.a / upp;
        let bp = n.b / upp;
        if ap < 1.0 {
            // Smaller than a pixel: deposit its integrated optical density bilinearly.
            let mass = std::f32::consts::PI * ap * bp * n.h;
            let (fx, fy) = (px - 0.5, py - 0.5);
            let (ix, iy) = (fx.floor(), fy.floor());
            let (tx, ty) = (fx - ix, fy - iy);
            for (oy, wy) in [(0, 1.0 - ty), (1, ty)] {
                for (ox, wx) in [(0, 1.0 - tx), (1, tx)] {
                    let (xx, yy) = (ix as i64 + ox, iy as i64 + oy);
                    if xx >= 0 && yy >= 0 && (xx as usize) < self.w && (yy as usize) < self.h {
                        let k = yy as usize * self.w + xx as usize;
                        let m = (mass * wx * wy).min(1.5);
                        self.he[k] += m * 0.85;
                        self.eo[k] *= 1.0 - (m * 0.4).min(0.6);
                    }
                }
            }
            return;
        }
        let reach = ap * 1.4 + 1.5;
        let (c, s) = (n.angle.cos(), n.angle.sin());
        let x_lo = ((px - reach).floor().max(0.0)) as usize;
        let x_hi = ((px + reach).ceil().min(self.w as f32)) as usize;
        let y_lo = ((py - reach).floor().max(0.0)) as usize;
        let y_hi = ((py + reach).ceil().min(self.h as f32)) as usize;
        // Chromatin texture only where its ~0.8 µm grain spans two or more pixels.
        let tex_w = ((0.8 / upp - 1.0).clamp(0.0, 1.0)) * n.chromatin;
        let tex_scale = upp as f64 / 0.8;
        for j in y_lo..y_hi {
            let dy = j as f32 + 0.5 - py;
            for i in x_lo..x_hi {
                let dx = i as f32 + 0.5 - px;
                let u = (dx * c + dy * s) / ap;
                let v = (-dx * s + dy * c) / bp;
                let r2 = u * u + v * v;
                if r2 > 2.0 {
                    continue;
                }
                let rho = r2.sqrt().max(1e-6);
                let (ct, st) = (u / rho, v / rho);
                let cos3 = 4.0 * ct * ct * ct - 3.0 * ct;
                let sin3 = 3.0 * st - 4.0 * st * st * st;
                let cos4 = 8.0 * ct * ct * ct * ct - 8.0 * ct * ct + 1.0;
                let edge = 1.0 + n.w3c * cos3 + n.w3s * sin3 + n.w4 * cos4;
                let alpha = ((edge - rho) * bp + 0.5).clamp(0.0, 1.0);
                if alpha <= 0.0 {
                    continue;
                }
                let mut hv = n.h * (0.8 + 0.25 * rho.min(1.0));
                if tex_w > 0.0 {
                    let t = value(n.seed, i as f64 * tex_scale + (n.seed & 1023) as f64, j as f64 * tex_scale);
                    hv *= 1.0 + tex_w * (t - 0.5) * 1.6;
                }
                let k = j * self.w + i;
                self.he[k] = self.he[k] * (1.0 - alpha) + alpha * (hv + 0.25 * self.he[k]);
                self.eo[k] *= 1.0 - 0.55 * alpha;
            }
        }
    }
}

/// Renders `view` of `field` into an 8-bit RGB image.
pub(crate) fn render(field: &Field, view: &View) -> RgbImage {
    let (w, h) = (view.width as usize, view.height as usize);
    let upp = view.um_per_px;
    let mut cv = Canvas {
        w,
        h,
        x0: view.cx - w as f64 * upp / 2.0,
        y0: view.cy - h as f64 * upp / 2.0,
        upp,
        eo: vec![0.0; w * h],
        he: vec![0.0; w * h],
    };

    base_layers(field, &mut cv);
    glands(field, &mut cv);
    let nuclei = nuclei_in_view(field, &cv);
    for n in &nuclei {
        cv.nucleus(n);
    }
    compose(&cv, &field.stain, view.grain_seed)
}

/// Stroma, background, sheets and mucin: smooth layers computed on a coarse grid and
/// interpolated, plus per-pixel fibre texture.
fn base_layers(field: &Field, cv: &mut Canvas) {
    let arch = &field.arch;
    const STEP: usize = 4;
    let gw = cv.w / STEP + 2;
    let gh = cv.h / STEP + 2;
    // Band limit of the coarse grid: features shorter than two grid steps are averaged out.
    let min_wl = 2.0 * STEP as f64 * cv.upp;
    // Per grid point: eosin = a·(1 + fibre) + b, hematoxylin = hh, and the fibre warp.
    // Everything but the fibre texture is smooth, so it is mixed here once per grid point.
    let mut grid = vec![[0.0f32; 4]; gw * gh];
    let (fc, fs) = field.fibre_base();
    let fib_seed = field.layer(FIBER);
    for gy in 0..gh {
        for gx in 0..gw {
            let (x, y) = cv.world((gx * STEP) as f32, (gy * STEP) as f32);
            let t = field.tissue(x, y, min_wl);
            let s = field.sheet(x, y, min_wl);
            let m = field.mucin(x, y, min_wl);
            let c = if m > 0.0 { field.cluster(x, y, min_wl) } else { 0.0 };
            let tone = fbm(field.layer(TONE), x, y, 80.0, 3, min_wl);
            // Fibres bend: their direction drifts over ~300 µm.
            let warp = field.fibre_warp(x, y);
            // Stroma, then epithelial sheet, mucin and floating clusters painted over it.
            let stroma = arch.stroma_e * (0.8 + 0.4 * tone);
            let (mut keep, mut e, mut hh) = (1.0f32, 0.0f32, 0.03f32);
            for (cover, (ce, ch)) in [(s, CYTO), (m * (1.0 - c), MUCIN_OD), (m * c, CYTO)] {
                keep *= 1.0 - cover;
                e += (ce - e) * cover;
                hh += (ch - hh) * cover;
            }
            // `e` is the painted-over part; the stroma shows through with weight `keep`.
            grid[gy * gw + gx] = [stroma * keep * t, e * t, hh * t, warp];
        }
    }
    // Fibres: 2 µm across, 14 µm along; drawn only where that is resolvable.
    let fib_w = ((2.0 / cv.upp - 1.5).clamp(0.0, 1.0)) as f32 * arch.fiber * 0.8;
    // Interpolate the grid in y once per pixel row, then in x per pixel.
    let mut row = vec![[0.0f32; 4]; gw];
    for j in 0..cv.h {
        let gy = j / STEP;
        let ty = (j % STEP) as f32 / STEP as f32;
        for (gx, r) in row.iter_mut().enumerate() {
            let (a, b) = (&grid[gy * gw + gx], &grid[(gy + 1) * gw + gx]);
            for k in 0..4 {
                r[k] = a[k] + (b[k] - a[k]) * ty;
            }
        }
        for i in 0..cv.w {
            let gx = i / STEP;
            let tx = (i % STEP) as f32 / STEP as f32;
            let (ra, rb) = (&row[gx], &row[gx + 1]);
            let lerp = |k: usize| ra[k] + (rb[k] - ra[k]) * tx;
            let (a, b, hh) = (lerp(0), lerp(1), lerp(2));
            let mut fib = 0.0;
            if fib_w > 0.0 && a > 0.0 {
                let (x, y) = cv.world(i as f32 + 0.5, j as f32 + 0.5);
                let (u, v) = (x * fc + y * fs, -x * fs + y * fc - lerp(3) as f64);
                fib = fib_w * (value(fib_seed, u / 14.0, v / 2.0) - 0.5) * 2.0;
            }
            let k = j * cv.w + i;
            cv.eo[k] = a * (1.0 + fib) + b;
            cv.he[k] = hh;
        }
    }
}

/// A gland (or papillary frond) drawn from gland cell (gx, gy), if that cell has one.
struct Gland {
    x: f64,
    y: f64,
    a: f32,
    b: f32,
    angle: f32,
    seed: u64,
}

fn gland_at(field: &Field, gx: i64, gy: i64) -> Option<Gland> {
    let arch = &field.arch;
    let g = arch.gland_spacing;
    let mut rng = Rng::new(hash_cell(field.layer(GLANDS), gx, gy));
    if !rng.chance(arch.gland_prob) {
        return None;
    }
    let aspect = rng.range(1.0, arch.gland_aspect);
    let r = (arch.gland_radius * (1.0 + arch.gland_radius_sd * rng.normal())).clamp(arch.gland_radius * 0.4, g * 0.46);
    // Keep the long axis inside the cell so glands of neighbouring cells never overlap.
    let a = (r * aspect.sqrt()).min(g * 0.48);
    let b = (r / aspect.sqrt()).max(a / arch.gland_aspect.max(1.0));
    // Centres wander enough that neighbouring glands may touch or overlap a little: no grid look.
    let margin = a * 0.6;
    let x = gx as f64 * g as f64 + (margin + rng.f32() * (g - 2.0 * margin).max(0.0)) as f64;
    let y = gy as f64 * g as f64 + (margin + rng.f32() * (g - 2.0 * margin).max(0.0)) as f64;
    if field.tissue(x, y, 0.0) < 0.5 || field.mucin(x, y, 0.0) > 0.5 {
        return None;
    }
    Some(Gland { x, y, a, b, angle: rng.range(0.0, std::f32::consts::PI), seed: rng.next_u64() })
}

/// The gland cells whose glands can touch the view.
fn gland_cells(field: &Field, cv: &Canvas) -> impl Iterator<Item = (i64, i64)> {
    let g = field.arch.gland_spacing as f64;
    let x1 = cv.x0 + cv.w as f64 * cv.upp;
    let y1 = cv.y0 + cv.h as f64 * cv.upp;
    let (gx0, gx1) = ((cv.x0 / g).floor() as i64, (x1 / g).floor() as i64);
    let (gy0, gy1) = ((cv.y0 / g).floor() as i64, (y1 / g).floor() as i64);
    (gy0..=gy1).flat_map(move |gy| (gx0..=gx1).map(move |gx| (gx, gy)))
}

fn glands(field: &Field, cv: &mut Canvas) {
    let arch = &field.arch;
    if arch.gland_spacing <= 0.0 || arch.gland_prob <= 0.0 {
        return;
    }
    let lumen = arch.lumen;
    let kind = arch.lumen_kind;
    let stroma_e = 0.5f32;
    let cells: Vec<_> = gland_cells(field, cv).collect();
    for (gx, gy) in cells {
        let Some(gl) = gland_at(field, gx, gy) else {
            continue;
        };
        if !cv.touches(gl.x, gl.y, gl.a as f64) {
            continue;
        }
        cv.ellipse(gl.x, gl.y, gl.a, gl.b, gl.angle, |cv, k, rho, alpha| {
            let (e, h) = if rho >= lumen {
                CYTO
            } else {
                match kind {
                    Lumen::Clear => LUMEN_OD,
                    Lumen::Filled => CYTO,
                    Lumen::Core => (stroma_e, 0.04),
                }
            };
            cv.eo[k] += (e - cv.eo[k]) * alpha;
            cv.he[k] += (h - cv.he[k]) * alpha;
        });
    }
}

/// Every nucleus that can touch the view: gland linings, sheets and clusters, strands,
/// stroma and lymphocytes.
fn nuclei_in_view(field: &Field, cv: &Canvas) -> Vec<Nucleus> {
    let arch = &field.arch;
    let mut out = Vec::new();
    let margin = (arch.nuc_r * 3.0) as f64;
    let x1 = cv.x0 + cv.w as f64 * cv.upp;
    let y1 = cv.y0 + cv.h as f64 * cv.upp;
    let cells = |spacing: f64| {
        let (ax, bx) = (((cv.x0 - margin) / spacing).floor() as i64, ((x1 + margin) / spacing).floor() as i64);
        let (ay, by) = (((cv.y0 - margin) / spacing).floor() as i64, ((y1 + margin) / spacing).floor() as i64);
        (ay..=by).flat_map(move |y| (ax..=bx).map(move |x| (x, y)))
    };

    // Gland linings (and filled lumens).
    if arch.gland_spacing > 0.0 && arch.gland_prob > 0.0 {
        for (gx, gy) in gland_cells(field, cv) {
            let Some(gl) = gland_at(field, gx, gy) else {
                continue;
            };
            if !cv.touches(gl.x, gl.y, gl.a as f64 + margin) {
                continue;
            }
            lining(arch, &gl, &mut out);
        }
    }

    // Sheets and mucin clusters: a jittered lattice of slots, accepted by the local density.
    let s = (arch.nuc_r * 2.3) as f64;
    let slot_seed = field.layer(SLOTS);
    if arch.sheet > 0.0 || arch.mucin > 0.0 {
        for (cx, cy) in cells(s) {
            let hc = hash_cell(slot_seed, cx, cy);
            let x = (cx as f64 + 0.15 + 0.7 * unit(hc) as f64) * s;
            let y = (cy as f64 + 0.15 + 0.7 * unit(mix(hc)) as f64) * s;
            let t = field.tissue(x, y, 0.0);
            if t < 0.3 {
                continue;
            }
            let m = field.mucin(x, y, 0.0);
            let p = field.sheet(x, y, 0.0) * arch.sheet_density * (1.0 - m)
                + if m > 0.0 { m * field.cluster(x, y, 0.0) * 0.9 } else { 0.0 };
            let mut rng = Rng::new(mix(hc ^ 0x5EED));
            if rng.f32() < p * t {
                let angle = rng.range(0.0, std::f32::consts::PI);
                out.push(epithelial(arch, x, y, angle, &mut rng));
            }
        }
    }

    // Single-file strands.
    if arch.strands > 0.0 {
        let seed = field.layer(STRANDS);
        let sp = 60.0;
        for (cx, cy) in cells(sp) {
            let mut rng = Rng::new(hash_cell(seed, cx, cy));
            let n = (arch.strands + rng.f32()).floor() as usize;
            for _ in 0..n {
                let mut x = (cx as f64 + rng.f32() as f64) * sp;
                let mut y = (cy as f64 + rng.f32() as f64) * sp;
                let mut dir = rng.range(0.0, std::f32::consts::TAU);
                let len = rng.range(4.0, 12.0) as usize;
                for _ in 0..len {
                    let step = arch.nuc_r * 2.3;
                    if field.tissue(x, y, 0.0) > 0.5 && field.sheet(x, y, 0.0) < 0.5 {
                        out.push(epithelial(arch, x, y, dir, &mut rng));
                    }
                    dir += rng.range(-0.25, 0.25);
                    x += (step * dir.cos()) as f64;
                    y += (step * dir.sin()) as f64;
                }
            }
        }
    }

    // Stromal fibroblasts (spindles along the fibres) and lymphocytes.
    let stroma_seed = field.layer(STROMA);
    for (cx, cy) in cells(12.0) {
        let mut rng = Rng::new(hash_cell(stroma_seed, cx, cy));
        if !rng.chance(arch.stroma_cells) {
            continue;
        }
        let x = (cx as f64 + rng.f32() as f64) * 12.0;
        let y = (cy as f64 + rng.f32() as f64) * 12.0;
        if field.tissue(x, y, 0.0) < 0.5 || field.sheet(x, y, 0.0) > 0.3 || field.mucin(x, y, 0.0) > 0.3 {
            continue;
        }
        let len = 2.2 * arch.spindle.sqrt();
        out.push(Nucleus {
            x,
            y,
            a: len * rng.range(0.8, 1.2),
            b: 2.2 / arch.spindle.sqrt(),
            angle: field.fibre_angle(x, y) + rng.range(-0.3, 0.3),
            w3c: 0.0,
            w3s: 0.0,
            w4: 0.05,
            h: 1.0 * rng.range(0.85, 1.1),
            chromatin: 0.0,
            seed: rng.next_u64(),
        });
    }
    let lymph_seed = field.layer(LYMPH);
    for (cx, cy) in cells(20.0) {
        let mut rng = Rng::new(hash_cell(lymph_seed, cx, cy));
        if !rng.chance(arch.lymph) {
            continue;
        }
        let x = (cx as f64 + rng.f32() as f64) * 20.0;
        let y = (cy as f64 + rng.f32() as f64) * 20.0;
        if field.tissue(x, y, 0.0) < 0.5 {
            continue;
        }
        let r = rng.range(2.2, 2.8);
        out.push(Nucleus {
            x,
            y,
            a: r,
            b: r * 0.92,
            angle: rng.range(0.0, std::f32::consts::PI),
            w3c: 0.0,
            w3s: 0.0,
            w4: 0.0,
            h: 1.6,
            chromatin: 0.0,
            seed: 0,
        });
    }
    out.retain(|n| cv.touches(n.x, n.y, n.a as f64 * 1.5));
    out
}

/// Nuclei along the rim of a gland (rows from the lumen outwards), or filling its lumen.
fn lining(arch: &Arch, gl: &Gland, out: &mut Vec<Nucleus>) {
    let mut rng = Rng::new(gl.seed);
    let (c, s) = (gl.angle.cos(), gl.angle.sin());
    let spacing = arch.nuc_r * 2.25;
    let rows = arch.rim_rows.max(1);
    let place = |u: f32, v: f32| (gl.x + (u * c - v * s) as f64, gl.y + (u * s + v * c) as f64);
    for row in 0..rows {
        let rho = arch.lumen + (1.0 - arch.lumen) * (row as f32 + 0.5) / rows as f32;
        let (ra, rb) = (gl.a * rho, gl.b * rho);
        let circ = std::f32::consts::TAU * ((ra * ra + rb * rb) / 2.0).sqrt();
        let n = (circ / spacing).floor().max(3.0) as usize;
        let phase = rng.f32();
        for k in 0..n {
            let phi = std::f32::consts::TAU * (k as f32 + phase + rng.range(-0.15, 0.15)) / n as f32;
            let (u, v) = (ra * phi.cos(), rb * phi.sin());
            let (x, y) = place(u, v);
            // Columnar cells stand perpendicular to the rim.
            let angle = gl.angle + phi;
            out.push(epithelial(arch, x, y, angle, &mut rng));
        }
    }
    if arch.lumen_kind == Lumen::Filled {
        let r_in = arch.lumen * gl.b;
        let a_in = arch.lumen * gl.a;
        let mut v = -r_in;
        while v < r_in {
            let mut u = -a_in;
            while u < a_in {
                let (uu, vv) = (u + rng.range(-0.3, 0.3) * spacing, v + rng.range(-0.3, 0.3) * spacing);
                if (uu / a_in).powi(2) + (vv / r_in).powi(2) < 0.9 && rng.chance(0.85) {
                    let (x, y) = place(uu, vv);
                    let angle = rng.range(0.0, std::f32::consts::PI);
                    out.push(epithelial(arch, x, y, angle, &mut rng));
                }
                u += spacing;
            }
            v += spacing;
        }
    }
}

/// Beer–Lambert: OD → RGB, plus faint sensor grain.
fn compose(cv: &Canvas, stain: &Stain, grain_seed: u64) -> RgbImage {
    let mut img = RgbImage::new(cv.w as u32, cv.h as u32);
    let buf: &mut [u8] = &mut img;
    let hv = stain.h.map(|v| v * stain.h_scale);
    let ev = stain.e.map(|v| v * stain.e_scale);
    let lut = transmission_lut();
    for (k, px) in buf.chunks_exact_mut(3).enumerate() {
        let (e, h) = (cv.eo[k], cv.he[k]);
        let g = mix(grain_seed ^ k as u64);
        for c in 0..3 {
            let od = hv[c] * h + ev[c] * e + stain.bg[c];
            let grain = ((g >> (c * 16)) & 0xFFFF) as f32 * (3.0 / 65536.0) - 1.5;
            let v = transmission(&lut, od) + grain;
            px[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    img
}

const LUT_MAX_OD: f32 = 8.0;
const LUT_SIZE: usize = 2048;

/// 255·exp(−od) sampled on [0, 8]: exp is the hottest operation of rendering, and linear
/// interpolation on this grid is exact to well under one grey level.
fn transmission_lut() -> Vec<f32> {
    (0..=LUT_SIZE + 1).map(|i| 255.0 * (-(i as f32) * LUT_MAX_OD / LUT_SIZE as f32).exp()).collect()
}

#[inline]
fn transmission(lut: &[f32], od: f32) -> f32 {
    let x = (od.max(0.0) * (LUT_SIZE as f32 / LUT_MAX_OD)).min(LUT_SIZE as f32);
    let i = x as usize;
    let t = x - i as f32;
    lut[i] + (lut[i + 1] - lut[i]) * t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmission_table_matches_exp_to_a_tenth_of_a_grey_level() {
        let lut = transmission_lut();
        let mut worst = 0.0f32;
        for i in 0..=80_000 {
            let od = i as f32 * 1e-4;
            worst = worst.max((transmission(&lut, od) - 255.0 * (-od).exp()).abs());
        }
        assert!(worst < 0.1, "max error {worst}");
        // Negative OD clamps to white, huge OD to (almost) black.
        assert_eq!(transmission(&lut, -1.0), 255.0);
        assert!(transmission(&lut, 100.0) < 0.1);
    }

    #[test]
    fn a_view_is_deterministic_and_centred() {
        let field =
            Field { seed: 3, arch: super::super::tissue::breakhis("DC"), stain: Stain::random(&mut Rng::new(1)) };
        let (cx, cy) = field.region_centre(1);
        assert!(field.tissue(cx, cy, 0.0) > 0.5, "region centre lies in tissue");
        let view = View { cx, cy, um_per_px: 0.5, width: 64, height: 48, grain_seed: 9 };
        let a = render(&field, &view);
        assert_eq!(a, render(&field, &view));
        assert_eq!(a.dimensions(), (64, 48));
        // Grain differs, tissue does not: another grain seed changes pixels by at most 3 levels.
        let b = render(&field, &View { grain_seed: 10, ..view });
        assert_ne!(a, b);
        let max_diff = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(max_diff <= 3, "{max_diff}");
    }
}
