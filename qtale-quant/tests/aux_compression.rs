//! MagR and magnitude / Wanda pruning against their papers' definitions: hand-computed cases and
//! fixtures produced by a float64 re-implementation of the authors' published rules (MagR: `X`
//! scaled to unit spectral norm, proximal gradient with Duchi's l1 projection, AozhongZhang/MagR;
//! Wanda: `|W| * ||X_j||_2` and its stable-sort / n:m rules, locuslab/wanda `lib/prune.py`) on the
//! deterministic `w_case` / `x_case` below. Only the numbers are kept here.
use qtale_quant::gptq::Gptq;
use qtale_quant::magr::{magr, normalized_gram, project_l1_ball};
use qtale_quant::method::Compressed;
use qtale_quant::prune::{apply_mask, keep_mask, wanda_score, Pattern, Scope};
use qtale_quant::rtn::quantize_rtn;
use qtale_quant::QuantConfig;
use tch::{Device, Kind, Tensor};

/// `w[r, c] = 0.1 sin(1.3 r + 0.7 c + 0.2)`, column 3 times 4 (an outlier input channel).
fn w_case(o: usize, i: usize) -> Vec<f64> {
    let mut w = Vec::with_capacity(o * i);
    for r in 0..o {
        for c in 0..i {
            let v = 0.1 * (1.3 * r as f64 + 0.7 * c as f64 + 0.2).sin();
            w.push(if c == 3 { v * 4.0 } else { v });
        }
    }
    w
}

/// `x[k, c] = cos(0.37 k (c + 1) + 0.11 k + 0.5 c)`, column 5 times 3.
fn x_case(n: usize, i: usize) -> Vec<f64> {
    let mut x = Vec::with_capacity(n * i);
    for k in 0..n {
        for c in 0..i {
            let (k, cf) = (k as f64, c as f64);
            let v = (0.37 * k * (cf + 1.0) + 0.11 * k + 0.5 * cf).cos();
            x.push(if c == 5 { v * 3.0 } else { v });
        }
    }
    x
}

fn t(v: &[f64], r: i64, c: i64) -> Tensor {
    Tensor::from_slice(v).view([r, c]).to_kind(Kind::Float)
}

fn hessian(x: &Tensor) -> Gptq {
    let mut g = Gptq::new(x.size()[1] as usize, QuantConfig::default(), Device::Cpu).unwrap();
    g.add_batch(x).unwrap();
    g
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

// magr channel: alpha 0.01, 50 iterations, group 16; row max before 0.2628 after 0.1835
const MAGR_CHANNEL: [f64; 96] = [
    2.026403512e-02,
    7.161597473e-02,
    9.962759179e-02,
    2.022301150e-01,
    1.215615463e-02,
    -5.501145563e-02,
    -9.858482748e-02,
    -9.681464648e-02,
    -4.956879186e-02,
    1.806629417e-02,
    8.137504362e-02,
    9.495973582e-02,
    5.632923440e-02,
    8.815099263e-03,
    -5.635321166e-02,
    -9.918933303e-02,
    9.436334447e-02,
    8.677130517e-02,
    2.369181217e-02,
    -9.436334447e-02,
    -8.986909372e-02,
    -9.436334447e-02,
    -5.343587513e-02,
    1.444704705e-02,
    7.550247414e-02,
    9.436334447e-02,
    7.811114605e-02,
    2.600788828e-02,
    -3.097514833e-02,
    -8.898130630e-02,
    -9.403512069e-02,
    -5.102507203e-02,
    3.310171298e-02,
    -2.836160653e-02,
    -8.682780873e-02,
    -2.969290752e-01,
    -6.117081761e-02,
    3.709231586e-03,
    6.912327996e-02,
    1.030500016e-01,
    8.856846473e-02,
    3.535554087e-02,
    -3.865617016e-02,
    -8.303517763e-02,
    -8.080729753e-02,
    -5.818336814e-02,
    5.313405295e-03,
    7.048280762e-02,
    -8.289422314e-02,
    -9.054944226e-02,
    -7.144044828e-02,
    -3.425735774e-02,
    5.788393619e-02,
    9.054944226e-02,
    9.054944226e-02,
    3.996464245e-02,
    -2.476823319e-02,
    -8.485506070e-02,
    -9.054944226e-02,
    -7.041162258e-02,
    -7.860336108e-03,
    5.921893156e-02,
    9.054944226e-02,
    9.007414607e-02,
    -7.687934672e-02,
    -2.493296666e-02,
    4.908156660e-02,
    2.791480208e-01,
    9.211720949e-02,
    4.807424411e-02,
    -2.085729821e-02,
    -8.100175923e-02,
    -1.031075946e-01,
    -7.964406303e-02,
    -1.455216031e-02,
    4.593174807e-02,
    7.725909156e-02,
    8.985916247e-02,
    4.668876831e-02,
    -2.261168954e-02,
    4.088209410e-02,
    8.315409335e-02,
    9.665921257e-02,
    1.379149073e-01,
    -9.470958224e-03,
    -7.201531030e-02,
    -1.029682454e-01,
    -8.651603775e-02,
    -2.943175306e-02,
    3.857099905e-02,
    9.260373146e-02,
    9.163137929e-02,
    4.000921158e-02,
    -1.282102811e-02,
    -7.312963481e-02,
    -1.032158380e-01,
];
// magr group8: alpha 0.005, 50 iterations, group 8; row max before 0.2628 after 0.2210
const MAGR_GROUP8: [f64; 96] = [
    2.223216110e-02,
    7.512791338e-02,
    1.001768597e-01,
    2.500126627e-01,
    8.662983410e-03,
    -5.455877236e-02,
    -9.783599106e-02,
    -9.654277512e-02,
    -4.810855548e-02,
    1.791034846e-02,
    7.613898412e-02,
    7.613898412e-02,
    6.424996353e-02,
    1.059889973e-02,
    -5.678548366e-02,
    -7.613898412e-02,
    9.836845372e-02,
    8.661748781e-02,
    2.565956153e-02,
    -1.289991090e-01,
    -8.908512661e-02,
    -9.524713950e-02,
    -5.626483910e-02,
    1.254898085e-02,
    7.446992210e-02,
    8.046791653e-02,
    7.918626704e-02,
    2.357485187e-02,
    -3.703514592e-02,
    -8.046791653e-02,
    -8.046791653e-02,
    -5.219531685e-02,
    3.369963296e-02,
    -3.323586708e-02,
    -8.681971004e-02,
    -3.413520725e-01,
    -5.965850706e-02,
    3.490047258e-03,
    6.744595005e-02,
    1.000117634e-01,
    7.212250620e-02,
    3.461652477e-02,
    -3.799502996e-02,
    -7.212250620e-02,
    -7.212250620e-02,
    -5.990614325e-02,
    4.745171919e-03,
    6.817122534e-02,
    -8.382000401e-02,
    -9.363874832e-02,
    -7.117530955e-02,
    -3.447781233e-02,
    5.822804059e-02,
    9.363874832e-02,
    9.170768235e-02,
    4.071566770e-02,
    -2.479888030e-02,
    -8.209415484e-02,
    -8.209415484e-02,
    -6.993829985e-02,
    -7.008388757e-03,
    5.949403090e-02,
    8.209415484e-02,
    8.209415484e-02,
    -7.599629538e-02,
    -2.057686159e-02,
    4.701746439e-02,
    3.256511186e-01,
    9.345050108e-02,
    4.841768818e-02,
    -1.759303051e-02,
    -7.590210684e-02,
    -7.801869079e-02,
    -7.801869079e-02,
    -1.404309795e-02,
    4.811234747e-02,
    7.801869079e-02,
    7.801869079e-02,
    4.809595016e-02,
    -2.063382633e-02,
    4.287564945e-02,
    8.660228962e-02,
    9.682091744e-02,
    1.862410689e-01,
    -1.204746004e-02,
    -7.187017569e-02,
    -1.024422540e-01,
    -8.591818883e-02,
    -2.856759080e-02,
    3.898151957e-02,
    8.007032014e-02,
    8.007032014e-02,
    4.753728677e-02,
    -1.084344350e-02,
    -7.366599027e-02,
    -8.007032014e-02,
];
const WANDA_ROW50: [u32; 8] = [29459, 40388, 26163, 14748, 52806, 29459, 40134, 26387];
const WANDA_24: [u32; 8] = [25427, 39366, 26163, 14748, 52422, 13203, 40134, 26163];
const MAG_LAYER50: [u32; 8] = [25393, 39108, 58995, 14748, 52326, 29489, 40134, 26419];
const MAG_24: [u32; 8] = [25395, 39366, 26163, 14748, 52326, 13107, 40134, 26163];

#[test]
fn magr_matches_the_reference_iteration() {
    let w = t(&w_case(6, 16), 6, 16);
    let g = hessian(&t(&x_case(40, 16), 40, 16));
    let a = normalized_gram(g.hessian()).unwrap().unwrap();
    for (alpha, group, want) in [(0.01, 16, &MAGR_CHANNEL), (0.005, 8, &MAGR_GROUP8)] {
        let got = magr(&w, &a, alpha, 50, group).unwrap();
        let d = max_abs_diff(&got, &t(want, 6, 16));
        eprintln!("MagR alpha {alpha} group {group}: max diff to the reference {d:.3e}");
        assert!(d < 1e-6, "alpha {alpha} group {group}: max diff {d:.3e}");
        // the largest weights shrink
        let m0 = w.abs().amax(1, false).mean(Kind::Float).double_value(&[]);
        let m1 = got.abs().amax(1, false).mean(Kind::Float).double_value(&[]);
        assert!(m1 < 0.9 * m0, "row max {m0} -> {m1}");
    }
    // The objective 1/2 tr(D A D^T) + alpha sum ||w_j||_inf (D = W' - W) decreases from W' = W.
    let alpha = 0.01;
    let obj = |wp: &Tensor| {
        let d = wp - &w;
        0.5 * (d.matmul(&a) * &d).sum(Kind::Float).double_value(&[])
            + alpha * wp.abs().amax(1, false).sum(Kind::Float).double_value(&[])
    };
    let got = magr(&w, &a, alpha, 50, 16).unwrap();
    assert!(obj(&got) < obj(&w), "{} vs {}", obj(&got), obj(&w));
    // alpha = 0 leaves the weight alone; the Hessian's scale does not matter (normalized).
    assert_eq!(max_abs_diff(&magr(&w, &a, 0.0, 5, 16).unwrap(), &w), 0.0);
    let a2 = normalized_gram(&(g.hessian() * 37.0)).unwrap().unwrap();
    assert!(max_abs_diff(&a, &a2) < 1e-6);
    // no signal: no matrix (MagR skipped); shape errors are errors
    assert!(
        normalized_gram(&Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)))
            .unwrap()
            .is_none()
    );
    assert!(magr(&w, &a.narrow(0, 0, 8), 0.01, 5, 16).is_err());
}

#[test]
fn magr_ragged_groups_are_zero_padded_exactly() {
    // Zero padding does not change a projection: P([x, 0, 0]) = [P(x), 0, 0].
    let x = Tensor::from_slice(&[0.9f32, -0.7, 0.4, 0.0, 0.0]).view([1, 5]);
    let p = project_l1_ball(&x);
    let q = project_l1_ball(&x.narrow(1, 0, 3));
    assert!(max_abs_diff(&p.narrow(1, 0, 3), &q) < 1e-7);
    assert_eq!(p.narrow(1, 3, 2).abs().max().double_value(&[]), 0.0);
    // group 5 over 16 columns (5 + 5 + 5 + 1) runs and shrinks the row maxima
    let w = t(&w_case(6, 16), 6, 16);
    let a = normalized_gram(hessian(&t(&x_case(40, 16), 40, 16)).hessian())
        .unwrap()
        .unwrap();
    let r = magr(&w, &a, 0.005, 20, 5).unwrap();
    assert_eq!(r.size(), [6, 16]);
    assert!(r.abs().max().double_value(&[]) < w.abs().max().double_value(&[]));
}

/// The pruned positions of a keep mask, as the rows' bit sets (bit j = column j pruned).
fn pruned_bits(keep: &Tensor) -> Vec<u32> {
    let (o, i) = (keep.size()[0], keep.size()[1]);
    let k = Vec::<bool>::try_from(keep.reshape([-1])).unwrap();
    (0..o as usize)
        .map(|r| {
            (0..i as usize)
                .filter(|&c| !k[r * i as usize + c])
                .map(|c| 1u32 << c)
                .sum()
        })
        .collect()
}

fn bits(cols: &[&[u32]]) -> Vec<u32> {
    cols.iter()
        .map(|c| c.iter().map(|j| 1u32 << j).sum())
        .collect()
}

/// 4 x 8 by hand. Column norms `||X_j||_2 = [4, 1, 1, 0.5, 2, 1, 0.25, 1]` (one input row).
#[test]
fn pruning_hand_computed_4x8() {
    #[rustfmt::skip]
    let w = Tensor::from_slice(&[
        1.0f32, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0,
        8.0, 7.0, -6.0, 5.0, -4.0, 3.0, -2.0, 1.0,
        0.5, 4.0, -0.25, 2.0, 3.0, -1.0, 6.0, -0.75,
        -3.0, 1.0, 2.0, -5.0, 0.1, 4.0, -2.5, 7.0,
    ])
    .view([4, 8]);
    let x = Tensor::from_slice(&[4.0f32, 1.0, 1.0, 0.5, 2.0, 1.0, 0.25, 1.0]).view([1, 8]);
    let h = hessian(&x);
    let wanda = wanda_score(&w, &h.hessian().diagonal(0, 0, 1));
    let mag = w.abs();
    let row50 = Pattern::Unstructured {
        sparsity: 0.5,
        scope: Scope::Row,
    };
    let nm24 = Pattern::NM { n: 2, m: 4 };
    // magnitude, per row: the 4 smallest |w| of each row
    assert_eq!(
        pruned_bits(&keep_mask(&mag, row50).unwrap()),
        bits(&[&[0, 1, 2, 3], &[4, 5, 6, 7], &[0, 2, 5, 7], &[1, 2, 4, 6]])
    );
    // Wanda scores: row 0 [4, 2, 3, 2, 10, 6, 1.75, 8], row 1 [32, 7, 6, 2.5, 8, 3, 0.5, 1],
    // row 2 [2, 4, 0.25, 1, 6, 1, 1.5, 0.75], row 3 [12, 1, 2, 2.5, 0.2, 4, 0.625, 7]
    assert_eq!(
        pruned_bits(&keep_mask(&wanda, row50).unwrap()),
        bits(&[&[1, 2, 3, 6], &[3, 5, 6, 7], &[2, 3, 5, 7], &[1, 2, 4, 6]])
    );
    // 2:4: the two largest of columns 0..4 and of 4..8 are kept
    assert_eq!(
        pruned_bits(&keep_mask(&mag, nm24).unwrap()),
        bits(&[&[0, 1, 4, 5], &[2, 3, 6, 7], &[0, 2, 5, 7], &[1, 2, 4, 6]])
    );
    assert_eq!(
        pruned_bits(&keep_mask(&wanda, nm24).unwrap()),
        bits(&[&[1, 3, 5, 6], &[2, 3, 6, 7], &[2, 3, 5, 7], &[1, 2, 4, 6]])
    );
    // magnitude over the layer: the 16 smallest of 32; the tie at 3 (r0c2, r1c5, r2c4, r3c0) is
    // broken by position, so r3c0 is the one kept
    let layer50 = Pattern::Unstructured {
        sparsity: 0.5,
        scope: Scope::Layer,
    };
    assert_eq!(
        pruned_bits(&keep_mask(&mag, layer50).unwrap()),
        bits(&[&[0, 1, 2], &[5, 6, 7], &[0, 2, 3, 4, 5, 7], &[1, 2, 4, 6]])
    );
}

#[test]
fn pruning_matches_the_reference_rules_on_a_fixed_case() {
    let mut wv = w_case(8, 16);
    wv[2 * 16 + 7] = -0.33;
    wv[5 * 16] = 0.01;
    let w = t(&wv, 8, 16);
    let h = hessian(&t(&x_case(24, 16), 24, 16));
    let wanda = wanda_score(&w, &h.hessian().diagonal(0, 0, 1));
    let mag = w.abs();
    let un = |s, scope| Pattern::Unstructured { sparsity: s, scope };
    let nm24 = Pattern::NM { n: 2, m: 4 };
    let cases = [
        (&wanda, un(0.5, Scope::Row), &WANDA_ROW50, "wanda 50%"),
        (&wanda, nm24, &WANDA_24, "wanda 2:4"),
        (
            &mag,
            un(0.5, Scope::Layer),
            &MAG_LAYER50,
            "magnitude 50% (layer)",
        ),
        (&mag, nm24, &MAG_24, "magnitude 2:4"),
    ];
    for (score, pattern, want, what) in cases {
        assert_eq!(
            &pruned_bits(&keep_mask(score, pattern).unwrap()),
            want,
            "{what}"
        );
    }
    // Wanda differs from magnitude on this case (the activation norms matter)
    assert_ne!(
        pruned_bits(&keep_mask(&mag, un(0.5, Scope::Row)).unwrap()),
        WANDA_ROW50
    );
}

#[test]
fn sparsity_is_exact() {
    tch::manual_seed(7);
    let w = Tensor::randn([16, 50], (Kind::Float, Device::Cpu));
    let pruned = |p| {
        keep_mask(&w.abs(), p)
            .unwrap()
            .logical_not()
            .sum(Kind::Int64)
            .int64_value(&[])
    };
    for s in [0.0, 0.1, 0.3, 0.5, 0.9] {
        let row = pruned(Pattern::Unstructured {
            sparsity: s,
            scope: Scope::Row,
        });
        assert_eq!(row, 16 * (s * 50.0_f64).floor() as i64, "row {s}");
        let layer = pruned(Pattern::Unstructured {
            sparsity: s,
            scope: Scope::Layer,
        });
        assert_eq!(layer, (s * 800.0_f64).floor() as i64, "layer {s}");
    }
    let w = Tensor::randn([16, 48], (Kind::Float, Device::Cpu));
    for (n, m) in [(2, 4), (4, 8), (1, 4)] {
        let keep = keep_mask(&w.abs(), Pattern::NM { n, m }).unwrap();
        let per_group = keep
            .view([16, 48 / m, m])
            .sum_dim_intlist(-1, false, Kind::Int64);
        assert_eq!(
            per_group.ne(n).sum(Kind::Int64).int64_value(&[]),
            0,
            "{n}:{m}"
        );
    }
}

#[test]
fn a_mask_survives_quantization() {
    tch::manual_seed(3);
    let w = Tensor::randn([8, 64], (Kind::Float, Device::Cpu));
    let keep = keep_mask(&w.abs(), Pattern::NM { n: 2, m: 4 }).unwrap();
    for sym in [false, true] {
        let cfg = QuantConfig {
            sym,
            ..QuantConfig::new(3, 16).unwrap()
        };
        // quantize the dense (unpruned) weight, so that the mask really has to act on the codes
        let q = quantize_rtn(&w, &cfg, None).unwrap();
        let before = q.dequantize();
        let Compressed::Quantized { weight, .. } = apply_mask(
            Compressed::Quantized {
                weight: q,
                gptq: None,
            },
            &keep,
        )
        .unwrap() else {
            panic!("not quantized")
        };
        let after = weight.dequantize();
        let pruned = keep.logical_not();
        assert_eq!(
            after.masked_select(&pruned).abs().max().double_value(&[]),
            0.0,
            "sym {sym}"
        );
        assert_eq!(
            max_abs_diff(&after.masked_select(&keep), &before.masked_select(&keep)),
            0.0
        );
    }
    let Compressed::Dense(d) = apply_mask(Compressed::Dense(w.copy()), &keep).unwrap() else {
        panic!("not dense")
    };
    assert_eq!(d.ne(0.0).sum(Kind::Int64).int64_value(&[]), 8 * 32);
}
