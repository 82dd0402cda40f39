//! The diffusion process: the DDIM schedule, steps, inversion and sampling loops.

pub mod ddim;
pub mod schedule;

pub use schedule::{Schedule, SchedulerConfig};
