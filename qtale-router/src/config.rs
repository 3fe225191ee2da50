//! [`RoutingConfig`]: where routers sit, how big they are, which tokens always run, and what skipped
//! tokens leave in the KV cache: what routers are trained with. The inference threshold theta is chosen
//! after training and lives on the routed model (`RoutedLlama::theta`); the Gumbel temperature is a
//! training-forward option.
use serde::{Deserialize, Serialize};

use crate::error::{Result, RouterError};

/// What a token that skips a layer leaves behind at that layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvPolicy {
    /// D-LLM: no K/V is written, and later queries never attend to the token at that layer.
    #[default]
    Evict,
    /// The skipped token still projects its K/V (input norm + k/v projections), so later tokens see it.
    ComputeKv,
}

/// Routing configuration (method.md section 1). Every field has the D-LLM default; unknown JSON fields
/// are rejected so a typo does not silently fall back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// First routed layer; layers `0..start_layer` always run. Default 2.
    pub start_layer: usize,
    /// The first `reserved_tokens` positions of every sequence run every layer (and are excluded from the
    /// execution ratio). Default 2.
    pub reserved_tokens: usize,
    /// K/V of skipped tokens. Default `evict`.
    pub kv_policy: KvPolicy,
    /// Hidden size of the D-LLM router MLP. Default 512 (scale it down for small models).
    pub hidden: usize,
    /// Epsilon of the router's RMSNorm. Not given by D-LLM; our default 1e-6.
    pub router_norm_eps: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            start_layer: 2,
            reserved_tokens: 2,
            kv_policy: KvPolicy::Evict,
            hidden: 512,
            router_norm_eps: 1e-6,
        }
    }
}

impl RoutingConfig {
    /// Check every field on its own (use [`RoutingConfig::validate_for`] once the model is known).
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(RouterError::config("hidden", "must be > 0"));
        }
        if !(self.router_norm_eps > 0.0 && self.router_norm_eps.is_finite()) {
            return Err(RouterError::config(
                "router_norm_eps",
                format!("must be finite and > 0, got {}", self.router_norm_eps),
            ));
        }
        Ok(())
    }

    /// [`RoutingConfig::validate`] plus the checks that need the model's depth.
    pub fn validate_for(&self, num_layers: usize) -> Result<()> {
        self.validate()?;
        if self.start_layer > num_layers {
            return Err(RouterError::config(
                "start_layer",
                format!(
                    "{} exceeds the model's {num_layers} layers",
                    self.start_layer
                ),
            ));
        }
        Ok(())
    }

    /// Parse from JSON and validate.
    pub fn from_json(s: &str) -> Result<Self> {
        let c: RoutingConfig = serde_json::from_str(s).map_err(|e| {
            // serde names the offending field in its message ("unknown field `x`", "invalid type ...").
            RouterError::config("<json>", e.to_string())
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Whether layer `l` has a router.
    pub fn is_routed(&self, l: usize) -> bool {
        l >= self.start_layer
    }
}
