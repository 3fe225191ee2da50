//! Execution statistics and FLOPs accounting of one routed forward ([`ExecStats`]), summarized into the
//! model crate's mergeable [`ExecSummary`] that scorers aggregate over batches.
//!
//! FLOPs count 2 per multiply-add of the matmuls (norms, RoPE, softmax and the residual adds are
//! ignored: they are O(d) per token against O(d^2)). Per token and executed layer:
//! attention projections `2 d (H hd) + 2 * 2 d (KV hd) + 2 (H hd) d`; attention `4 H hd n_vis` where
//! `n_vis` is the number of keys the query really sees at that layer (valid, at a position <= its own);
//! MLP `3 * 2 d I`. A token that skips a routed layer under `compute_kv` pays `2 * 2 d (KV hd)`. Every
//! real token pays the router at every routed layer ([`crate::Router::flops_per_token`]) and the LM head
//! `2 d V`. Dense = every layer executed, `n_vis = position + 1`, no router.
use qtale_model::decoder::{ExecSummary, FlopModel};
use qtale_model::KvCache;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{KvPolicy, RoutingConfig};
use crate::router::Router;

/// Statistics of one forward. Shapes: `B` rows, `T` tokens, `L` layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecStats {
    pub batch: usize,
    pub seq: usize,
    pub num_layers: usize,
    /// Execute bit per (row, token, layer); always-run layers are 1 for real tokens, padding is 0.
    pub exec: Vec<Vec<Vec<bool>>>,
    /// Real tokens `[B][T]`.
    pub valid: Vec<Vec<bool>>,
    /// Reserved tokens `[B][T]` (always run every layer; excluded from the ratios).
    pub reserved: Vec<Vec<bool>>,
    /// Execution ratio per token `[B][T]` (mean over all L layers, always-run layers count 1); `None` for
    /// padding. Reserved tokens are included here (they are 1).
    pub token_ratio: Vec<Vec<Option<f64>>>,
    /// Per layer: fraction of counted tokens (real, not reserved) that execute it.
    pub layer_ratio: Vec<f64>,
    /// Mean token ratio over counted tokens: the execution ratio of the method.
    pub ratio: f64,
    /// The same restricted to routed layers.
    pub routed_ratio: f64,
    /// FLOPs executed per token `[B][T]` (0 for padding), and what the dense model spends there.
    pub flops: Vec<Vec<f64>>,
    pub dense_flops: Vec<Vec<f64>>,
    /// Totals over real tokens.
    pub flops_total: f64,
    pub dense_flops_total: f64,
    /// Real tokens, and real non-reserved ("counted") tokens.
    pub valid_tokens: usize,
    pub counted_tokens: usize,
    /// K/V bytes the cache holds for valid keys after this forward (all layers), and what a dense cache
    /// would hold for the same tokens.
    pub kv_bytes: f64,
    pub dense_kv_bytes: f64,
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1])).expect("i64 data")
}

impl ExecStats {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn compute<R: Router>(
        fm: &FlopModel,
        cfg: &RoutingConfig,
        router: &R,
        exec: &Tensor,
        valid: &Tensor,
        reserved: &Tensor,
        positions: &Tensor,
        visible: &[Tensor],
        cache: &KvCache,
    ) -> Self {
        let s = exec.size();
        let (b, t, l) = (s[0] as usize, s[1] as usize, s[2] as usize);
        let ex: Vec<bool> = to_vec_i64(exec).into_iter().map(|v| v != 0).collect();
        let va: Vec<bool> = to_vec_i64(valid).into_iter().map(|v| v != 0).collect();
        let re: Vec<bool> = to_vec_i64(reserved).into_iter().map(|v| v != 0).collect();
        let pos = to_vec_i64(positions);
        let vis: Vec<Vec<i64>> = visible.iter().map(to_vec_i64).collect();
        let router_flops: Vec<f64> = (0..l)
            .map(|i| {
                if cfg.is_routed(i) {
                    router.flops_per_token(i)
                } else {
                    0.0
                }
            })
            .collect();
        let mut st = ExecStats {
            batch: b,
            seq: t,
            num_layers: l,
            exec: vec![vec![vec![false; l]; t]; b],
            valid: vec![vec![false; t]; b],
            reserved: vec![vec![false; t]; b],
            token_ratio: vec![vec![None; t]; b],
            layer_ratio: vec![0.0; l],
            ratio: 0.0,
            routed_ratio: 0.0,
            flops: vec![vec![0.0; t]; b],
            dense_flops: vec![vec![0.0; t]; b],
            flops_total: 0.0,
            dense_flops_total: 0.0,
            valid_tokens: 0,
            counted_tokens: 0,
            kv_bytes: cache.valid_bytes() as f64,
            dense_kv_bytes: 0.0,
        };
        let mut layer_counts = vec![0usize; l];
        let mut ratio_sum = 0.0;
        let n_routed = (0..l).filter(|&i| cfg.is_routed(i)).count();
        let mut routed_sum = 0usize;
        for bi in 0..b {
            for ti in 0..t {
                let k = bi * t + ti;
                st.valid[bi][ti] = va[k];
                st.reserved[bi][ti] = re[k];
                if !va[k] {
                    continue;
                }
                st.valid_tokens += 1;
                let mut n_exec = 0usize;
                let mut f = fm.lm_head;
                for li in 0..l {
                    let e = ex[k * l + li];
                    st.exec[bi][ti][li] = e;
                    f += router_flops[li];
                    if e {
                        n_exec += 1;
                        let nv = vis.get(li).map_or(pos[k] + 1, |v| v[k]);
                        f += fm.attn_proj + fm.mlp + fm.attn_per_key * nv as f64;
                    } else if cfg.is_routed(li) && cfg.kv_policy == KvPolicy::ComputeKv {
                        f += fm.kv_proj;
                    }
                }
                let r = n_exec as f64 / l as f64;
                st.token_ratio[bi][ti] = Some(r);
                st.flops[bi][ti] = f;
                st.dense_flops[bi][ti] = fm.dense_token(pos[k]);
                st.flops_total += f;
                st.dense_flops_total += st.dense_flops[bi][ti];
                if !re[k] {
                    st.counted_tokens += 1;
                    ratio_sum += r;
                    for (li, c) in layer_counts.iter_mut().enumerate() {
                        if ex[k * l + li] {
                            *c += 1;
                            if cfg.is_routed(li) {
                                routed_sum += 1;
                            }
                        }
                    }
                }
            }
        }
        let n = st.counted_tokens.max(1) as f64;
        st.layer_ratio = layer_counts.iter().map(|&c| c as f64 / n).collect();
        st.ratio = if st.counted_tokens == 0 {
            1.0
        } else {
            ratio_sum / n
        };
        st.routed_ratio = if st.counted_tokens == 0 || n_routed == 0 {
            1.0
        } else {
            routed_sum as f64 / (n * n_routed as f64)
        };
        let held: i64 = cache
            .next_pos
            .as_ref()
            .map_or(0, |p| p.sum(Kind::Int64).int64_value(&[]));
        let per_key =
            cache
                .layers
                .iter()
                .find_map(|c| c.k.as_ref())
                .map_or(fm.kv_bytes_per_key, |k| {
                    let s = k.size();
                    (2 * s[1] * s[3]) as f64 * k.kind().elt_size_in_bytes() as f64
                });
        st.dense_kv_bytes = held as f64 * l as f64 * per_key;
        st
    }

    /// Executed FLOPs as a fraction of dense.
    pub fn flops_fraction(&self) -> f64 {
        self.flops_total / self.dense_flops_total.max(f64::MIN_POSITIVE)
    }

    /// The mergeable summary.
    pub fn summary(&self) -> ExecSummary {
        let mut layer_exec = vec![0u64; self.num_layers];
        for (bi, row) in self.exec.iter().enumerate() {
            for (ti, tok) in row.iter().enumerate() {
                if self.valid[bi][ti] && !self.reserved[bi][ti] {
                    for (li, &e) in tok.iter().enumerate() {
                        layer_exec[li] += u64::from(e);
                    }
                }
            }
        }
        ExecSummary {
            forwards: 1,
            num_layers: self.num_layers,
            valid_tokens: self.valid_tokens as u64,
            counted_tokens: self.counted_tokens as u64,
            layer_exec,
            flops: self.flops_total,
            dense_flops: self.dense_flops_total,
            kv_bytes: self.kv_bytes,
            dense_kv_bytes: self.dense_kv_bytes,
        }
    }
}
