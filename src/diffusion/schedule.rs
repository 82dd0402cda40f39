//! The DDIM noise schedule of SD 1.5 (ALGORITHM.md §1.3): `scaled_linear` betas from 0.00085 to
//! 0.012 over 1000 steps, "leading" timestep spacing with `steps_offset` 1, and
//! `set_alpha_to_one = false` (the ᾱ before the first step is ᾱ_0).

use serde::Deserialize;

use crate::error::{Error, Result};

/// `scheduler/scheduler_config.json` (its class name is ignored: DragonDiffusion uses DDIM with
/// these parameters whatever scheduler the folder names).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_offset")]
    pub steps_offset: usize,
    #[serde(default)]
    pub set_alpha_to_one: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_offset() -> usize {
    1
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
        }
    }
}

impl SchedulerConfig {
    pub fn parse(file: &str, json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::ModelFile {
            file: file.into(),
            message: format!("not a scheduler config: {e}"),
        })
    }
}

/// ᾱ for every training timestep, computed in f32 as diffusers does.
#[derive(Debug, Clone)]
pub struct Schedule {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    steps_offset: usize,
}

impl Schedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(Error::InvalidInput(
                "num_train_timesteps must be at least 2".into(),
            ));
        }
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .map(|b| (b as f32) * (b as f32))
                .collect(),
            "linear" => linspace(config.beta_start, config.beta_end, n)
                .map(|b| b as f32)
                .collect(),
            other => {
                return Err(Error::InvalidInput(format!(
                    "beta_schedule {other} is not supported (scaled_linear or linear)"
                )));
            }
        };
        let mut acc = 1f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            steps_offset: config.steps_offset,
        })
    }

    /// The SD 1.5 schedule.
    pub fn sd15() -> Self {
        // The default config is valid by construction.
        Self::new(&SchedulerConfig::default()).unwrap_or_else(|_| unreachable!())
    }

    /// ᾱ_t; negative t (the step before t = 0) gives the final ᾱ.
    pub fn alpha_bar(&self, t: i64) -> f32 {
        usize::try_from(t)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .unwrap_or(self.final_alpha_cumprod)
    }

    /// Training timesteps per inference step ("leading" spacing: 1000 / steps).
    pub fn stride(&self, steps: usize) -> usize {
        self.alphas_cumprod.len() / steps.max(1)
    }

    /// Denoising timesteps, descending: for 50 steps `981, 961, ..., 1`.
    pub fn timesteps(&self, steps: usize) -> Vec<i64> {
        let stride = self.stride(steps);
        (0..steps)
            .rev()
            .map(|i| (i * stride + self.steps_offset) as i64)
            .collect()
    }
}

/// torch.linspace in f64 (start + i·step for the first half, end − (n−1−i)·step after).
fn linspace(start: f64, end: f64, n: usize) -> impl Iterator<Item = f64> {
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(move |i| {
        if i < n / 2 {
            start + step * i as f64
        } else {
            end - step * (n - 1 - i) as f64
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_step_timesteps_match_the_reference() {
        let s = Schedule::sd15();
        let t = s.timesteps(50);
        assert_eq!(t.len(), 50);
        assert_eq!((t[0], t[1], t[49]), (981, 961, 1));
        assert!(t.windows(2).all(|w| w[0] - w[1] == 20));
    }

    #[test]
    fn alpha_bar_matches_the_algorithm_table() {
        // ALGORITHM.md §1.3, values from diffusers 0.18 (7 significant digits).
        let s = Schedule::sd15();
        let table: [(i64, f64); 8] = [
            (981, 0.0057755),
            (961, 0.0072817),
            (781, 0.0434560),
            (581, 0.1798635),
            (381, 0.4552386),
            (21, 0.9803807),
            (1, 0.9982960),
            (-19, 0.9991500),
        ];
        for (t, expected) in table {
            let got = f64::from(s.alpha_bar(t));
            assert!(
                ((got - expected) / expected).abs() < 2e-6,
                "t={t}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn variance_matches_the_algorithm_table() {
        let s = Schedule::sd15();
        let var = |t: i64, p: i64| {
            let (a, ap) = (s.alpha_bar(t), s.alpha_bar(p));
            (1.0 - ap) / (1.0 - a) * (1.0 - a / ap)
        };
        for (t, expected) in [(981, 0.206537f32), (581, 0.104261), (1, 0.00042635)] {
            let got = var(t, t - 20);
            assert!(((got - expected) / expected).abs() < 1e-4, "t={t}: {got}");
        }
    }
}
