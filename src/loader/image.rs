//! The loader's image type: packed RGB u8, row major (what OpenCV / albumentations work on).

/// An RGB u8 image, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// A black image.
    pub fn new(width: usize, height: usize) -> Rgb8 {
        Rgb8 { width, height, data: vec![0; width * height * 3] }
    }

    /// Wraps packed RGB bytes; `None` if the length does not match the size.
    pub fn from_raw(width: usize, height: usize, data: Vec<u8>) -> Option<Rgb8> {
        (data.len() == width * height * 3).then_some(Rgb8 { width, height, data })
    }

    pub fn pixels(&self) -> usize {
        self.width * self.height
    }

    /// The three channels of pixel (x, y).
    pub fn px(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}
