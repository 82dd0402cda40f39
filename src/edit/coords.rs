//! The four coordinate spaces of an edit and every conversion between them, named by their
//! spaces (ALGORITHM.md §1.2, §3, §7):
//! - input pixels: the user's photo, where points and masks are given;
//! - working pixels: the photo resized to about R x R with sides multiples of 64;
//! - the guidance grid: working / 4, where features are compared and energies live;
//! - the latent grid: working / 8, where the diffusion runs.

use super::mask::Mask;

/// Working pixels per guidance-grid cell.
pub const GRID_CELL: usize = 4;
/// Working pixels per latent cell.
pub const LATENT_CELL: usize = 8;

/// A point `(x, y)` = (column, row), in whichever space its name says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

impl Point {
    pub fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }
}

/// A cell `(row, col)` on the guidance or the latent grid.
pub type Cell = (usize, usize);

/// The sizes of one edit's spaces, `(height, width)` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spaces {
    pub input: (usize, usize),
    pub working: (usize, usize),
}

impl Spaces {
    pub fn new(input: (usize, usize), working: (usize, usize)) -> Self {
        Self { input, working }
    }

    pub fn grid(&self) -> (usize, usize) {
        (self.working.0 / GRID_CELL, self.working.1 / GRID_CELL)
    }

    pub fn latent(&self) -> (usize, usize) {
        (self.working.0 / LATENT_CELL, self.working.1 / LATENT_CELL)
    }

    /// Scale factors input → working per axis `(y, x)`. The reference uses the width ratio for
    /// both; with sides rounded to multiples of 64 the two differ slightly, so each axis gets its
    /// own (identical when the aspect ratio survives the rounding).
    fn input_scale(&self) -> (f64, f64) {
        (
            self.working.0 as f64 / self.input.0 as f64,
            self.working.1 as f64 / self.input.1 as f64,
        )
    }

    pub fn input_to_working(&self, p: Point) -> Point {
        let (sy, sx) = self.input_scale();
        Point::new(p.x * sx, p.y * sy)
    }

    /// A displacement (arrow, paste offset) from input to working pixels.
    pub fn input_offset_to_working(&self, d: Point) -> Point {
        self.input_to_working(d)
    }

    /// The grid cell holding a working-pixel point, `floor(v / 4)`, clamped into the grid.
    pub fn working_to_grid_cell(&self, p: Point) -> Cell {
        let (gh, gw) = self.grid();
        let cell = |v: f64, n: usize| ((v / GRID_CELL as f64).floor().max(0.0) as usize).min(n - 1);
        (cell(p.y, gh), cell(p.x, gw))
    }

    /// The latent cell of a guidance-grid cell (`// 2`).
    pub fn grid_to_latent_cell(&self, c: Cell) -> Cell {
        (c.0 / 2, c.1 / 2)
    }

    /// A working-pixel displacement in guidance-grid cells as move mode shifts its masks:
    /// `floor(d / 4)`, times the resize factor, truncated (ALGORITHM.md §7).
    pub fn working_offset_to_grid_cells_scaled(&self, d: f64, scale: f64) -> i64 {
        ((d / GRID_CELL as f64).floor() * scale).trunc() as i64
    }

    /// A working-pixel displacement in guidance-grid cells, truncated (paste's reference-cell
    /// shift).
    pub fn working_offset_to_grid_cells(&self, d: f64) -> i64 {
        (d / GRID_CELL as f64).trunc() as i64
    }

    /// A working-pixel displacement in latent cells: truncated as the official code does
    /// (`truncate`), or to the nearest cell.
    pub fn working_offset_to_latent_cells(&self, d: f64, truncate: bool) -> i64 {
        let cells = d / LATENT_CELL as f64;
        if truncate {
            cells.trunc() as i64
        } else {
            cells.round() as i64
        }
    }

    /// A user mask from input pixels to working pixels (OpenCV bilinear, then `> 0.5`).
    pub fn mask_input_to_working(&self, m: &Mask) -> Mask {
        m.bilinear_any(self.working.0, self.working.1)
    }

    pub fn mask_working_to_grid(&self, m: &Mask) -> Mask {
        let (gh, gw) = self.grid();
        m.nearest(gh, gw)
    }

    pub fn mask_working_to_latent(&self, m: &Mask) -> Mask {
        let (lh, lw) = self.latent();
        m.nearest(lh, lw)
    }

    pub fn mask_grid_to_latent(&self, m: &Mask) -> Mask {
        let (lh, lw) = self.latent();
        m.nearest(lh, lw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_between_spaces() {
        // A 1024x768 photo worked at 512x384.
        let s = Spaces::new((768, 1024), (384, 512));
        assert_eq!(s.grid(), (96, 128));
        assert_eq!(s.latent(), (48, 64));
        let p = s.input_to_working(Point::new(200.0, 400.0));
        assert_eq!((p.x, p.y), (100.0, 200.0));
        // ALGORITHM.md §12.3: (x=100, y=200) at 512 px → grid (50, 25) → latent (25, 12).
        let c = s.working_to_grid_cell(p);
        assert_eq!(c, (50, 25));
        assert_eq!(s.grid_to_latent_cell(c), (25, 12));
        assert_eq!(s.working_to_grid_cell(Point::new(-3.0, 1e6)), (95, 0));
    }
}
