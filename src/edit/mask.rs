//! Boolean masks on any of the engine's grids, and the resampling rules of the reference
//! (ALGORITHM.md §7): OpenCV bilinear + `> 0.5` from the user's pixels to the working size,
//! legacy PyTorch nearest (`src = floor(dst · in / out)`) between grids.

use image::RgbImage;

/// A row-major `h x w` grid of booleans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub h: usize,
    pub w: usize,
    cells: Vec<bool>,
}

/// Legacy PyTorch `nearest`: the source index of `dst` when resizing `src_len` to `dst_len`.
pub fn nearest_source(dst: usize, src_len: usize, dst_len: usize) -> usize {
    (dst * src_len / dst_len.max(1)).min(src_len.saturating_sub(1))
}

impl Mask {
    pub fn empty(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            cells: vec![false; h * w],
        }
    }

    pub fn from_fn(h: usize, w: usize, mut f: impl FnMut(usize, usize) -> bool) -> Self {
        let mut cells = Vec::with_capacity(h * w);
        for y in 0..h {
            for x in 0..w {
                cells.push(f(y, x));
            }
        }
        Self { h, w, cells }
    }

    /// A user mask: channel 0 of the image, any non-zero value set (the reference's `> 0.5`
    /// on the 0..255 scale).
    pub fn from_image(img: &RgbImage) -> Self {
        let (w, h) = img.dimensions();
        Self::from_fn(h as usize, w as usize, |y, x| {
            img.get_pixel(x as u32, y as u32)[0] > 0
        })
    }

    /// A mask of size `(h, w)` with the row-major `indices` set.
    pub fn from_cells(indices: &[usize], (h, w): (usize, usize)) -> Self {
        let mut m = Self::empty(h, w);
        for &i in indices {
            m.cells[i] = true;
        }
        m
    }

    pub fn get(&self, y: usize, x: usize) -> bool {
        self.cells[y * self.w + x]
    }

    pub fn set(&mut self, y: usize, x: usize, v: bool) {
        self.cells[y * self.w + x] = v;
    }

    pub fn cells(&self) -> &[bool] {
        &self.cells
    }

    pub fn count(&self) -> usize {
        self.cells.iter().filter(|&&c| c).count()
    }

    pub fn is_empty(&self) -> bool {
        !self.cells.iter().any(|&c| c)
    }

    /// Row-major indices of the set cells.
    pub fn indices(&self) -> Vec<usize> {
        (0..self.cells.len()).filter(|&i| self.cells[i]).collect()
    }

    /// 0/1 values, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.cells.iter().map(|&c| f32::from(u8::from(c))).collect()
    }

    /// Nearest-neighbour resize with the legacy PyTorch rule.
    pub fn nearest(&self, h: usize, w: usize) -> Self {
        Self::from_fn(h, w, |y, x| {
            self.get(nearest_source(y, self.h, h), nearest_source(x, self.w, w))
        })
    }

    /// OpenCV's bilinear resize (half-pixel centres, no antialiasing) of a 0/255 mask followed
    /// by `> 0.5`: a cell is set when any source pixel with a non-zero weight is set.
    pub fn bilinear_any(&self, h: usize, w: usize) -> Self {
        if (h, w) == (self.h, self.w) {
            return self.clone();
        }
        let taps = |dst: usize, src_len: usize, dst_len: usize| -> [(usize, bool); 2] {
            let f = (dst as f64 + 0.5) * src_len as f64 / dst_len as f64 - 0.5;
            let f = f.max(0.0);
            let i0 = (f.floor() as usize).min(src_len - 1);
            let i1 = (i0 + 1).min(src_len - 1);
            let frac = f - i0 as f64;
            [(i0, frac < 1.0), (i1, frac > 0.0)]
        };
        Self::from_fn(h, w, |y, x| {
            taps(y, self.h, h).iter().any(|&(sy, wy)| {
                wy && taps(x, self.w, w)
                    .iter()
                    .any(|&(sx, wx)| wx && self.get(sy, sx))
            })
        })
    }

    pub fn and(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a && b)
    }

    pub fn or(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a || b)
    }

    pub fn and_not(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a && !b)
    }

    pub fn not(&self) -> Self {
        Self {
            h: self.h,
            w: self.w,
            cells: self.cells.iter().map(|&c| !c).collect(),
        }
    }

    fn zip(&self, other: &Self, f: impl Fn(bool, bool) -> bool) -> Self {
        assert_eq!((self.h, self.w), (other.h, other.w), "mask sizes differ");
        Self {
            h: self.h,
            w: self.w,
            cells: self
                .cells
                .iter()
                .zip(&other.cells)
                .map(|(&a, &b)| f(a, b))
                .collect(),
        }
    }

    /// Applies a [`Placement`] per axis: cell `(y, x)` of the result is
    /// `self[rows.source(y), cols.source(x)]`, or unset where the placement leaves it empty.
    pub fn placed(&self, rows: &Placement, cols: &Placement) -> Self {
        Self::from_fn(rows.len, cols.len, |y, x| {
            match (rows.source(y), cols.source(x)) {
                (Some(sy), Some(sx)) => self.get(sy, sx),
                _ => false,
            }
        })
    }
}

/// One axis of the reference's "scale by r (nearest), shift, centre-crop or centre-pad back to
/// the original length" (ALGORITHM.md §7). `wrap` reproduces `torch.roll`; without it cells
/// shifted past the edge are dropped and the vacated ones stay empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Length of the input and of the output.
    pub len: usize,
    /// Length of the scaled canvas, `floor(len · r)`.
    pub scaled: usize,
    /// Shift applied on the scaled canvas, in its cells.
    pub shift: i64,
    pub wrap: bool,
}

impl Placement {
    pub fn new(len: usize, scale: f64, shift: i64, wrap: bool) -> Self {
        let scaled = ((len as f64 * scale).floor() as usize).max(1);
        Self {
            len,
            scaled,
            shift,
            wrap,
        }
    }

    fn offset(&self) -> usize {
        self.len.abs_diff(self.scaled) / 2
    }

    /// Canvas cell (after scaling, before the shift) → output cell.
    pub fn forward(&self, canvas: usize) -> Option<usize> {
        let mut p = canvas as i64 + self.shift;
        let n = self.scaled as i64;
        if self.wrap {
            p = p.rem_euclid(n);
        } else if p < 0 || p >= n {
            return None;
        }
        let out = if self.scaled >= self.len {
            p - self.offset() as i64
        } else {
            p + self.offset() as i64
        };
        (0..self.len as i64).contains(&out).then_some(out as usize)
    }

    /// Output cell → canvas cell (after scaling, before the shift).
    pub fn canvas_of(&self, out: usize) -> Option<usize> {
        let p = if self.scaled >= self.len {
            (out + self.offset()) as i64
        } else {
            out as i64 - self.offset() as i64
        };
        let n = self.scaled as i64;
        if p < 0 || p >= n {
            return None;
        }
        let mut c = p - self.shift;
        if self.wrap {
            c = c.rem_euclid(n);
        } else if c < 0 || c >= n {
            return None;
        }
        Some(c as usize)
    }

    /// Output cell → cell of the unscaled input.
    pub fn source(&self, out: usize) -> Option<usize> {
        self.canvas_of(out)
            .map(|c| nearest_source(c, self.len, self.scaled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_uses_the_legacy_floor_rule() {
        // 5 → 2: sources floor(0·5/2) = 0 and floor(1·5/2) = 2.
        let m = Mask::from_fn(1, 5, |_, x| x == 2);
        assert_eq!(m.nearest(1, 2).cells(), &[false, true]);
        assert_eq!(nearest_source(3, 16, 8), 6);
    }

    #[test]
    fn bilinear_any_marks_every_touched_cell() {
        let m = Mask::from_fn(4, 4, |y, x| y == 1 && x == 1);
        // Upscaling 4 → 8: output cells whose two taps include source 1 are set.
        let up = m.bilinear_any(8, 8);
        let rows: Vec<usize> = (0..8).filter(|&y| up.get(y, 2)).collect();
        assert_eq!(rows, vec![1, 2, 3, 4]);
        assert_eq!(m.bilinear_any(4, 4), m);
    }

    #[test]
    fn placement_shift_scale_and_wrap() {
        let p = Placement::new(8, 1.0, 3, false);
        assert_eq!(p.forward(6), None);
        assert_eq!(p.forward(2), Some(5));
        assert_eq!(p.source(5), Some(2));
        assert_eq!(p.source(1), None);
        let wrap = Placement::new(8, 1.0, 3, true);
        assert_eq!(wrap.forward(6), Some(1));
        assert_eq!(wrap.source(1), Some(6));
        // r = 0.5: canvas of 4 cells padded by 2 on each side.
        let half = Placement::new(8, 0.5, 0, false);
        assert_eq!(half.forward(0), Some(2));
        assert_eq!(half.source(2), Some(0));
        assert_eq!(half.source(3), Some(2));
        assert_eq!(half.source(7), None);
        // r = 1.5: canvas of 12 cropped by 2.
        let big = Placement::new(8, 1.5, 0, false);
        assert_eq!(big.forward(1), None);
        assert_eq!(big.forward(2), Some(0));
        assert_eq!(big.source(0), Some(1));
        for c in 0..12 {
            if let Some(o) = big.forward(c) {
                assert_eq!(big.canvas_of(o), Some(c));
            }
        }
    }
}
