//! The DragonDiffusion editing engine (ALGORITHM.md, the `'D'` path): the edit spec, the
//! coordinate spaces and masks, the energies and their gradient, the memory bank and the
//! guided sampler.

pub mod bank;
pub mod coords;
pub mod energy;
pub mod engine;
pub mod guidance;
pub mod initial;
pub mod inversion_cache;
pub mod mask;
pub mod plan;
pub mod spec;

pub use bank::BankPolicy;
pub use engine::{EditOutput, Editor, EngineOptions, Preview, StepBank, Trace};
pub use guidance::GradientMemory;
pub use inversion_cache::{Inversion, InversionCache};
pub use plan::{EditPlan, Fidelity};
pub use spec::{Edit, EditSpec, ModeKind};
