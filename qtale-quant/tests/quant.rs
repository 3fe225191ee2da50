//! RTN formula, GPTQ vs RTN on correlated inputs, AWQ searches, GPTQ and AWQ packed layout round trips
//! and errors.
use qtale_quant::awq::{search_clip, search_scales, ALPHA_GRID};
use qtale_quant::gptq::Gptq;
use qtale_quant::packed::{
    read_quantization_config, save_safetensors, AwqQuantizationConfig, AwqTensors, Checkpoint,
    GptqPacked, GptqQuantizationConfig, HfQuantizationConfig, PackedLayout, StoredLinear,
};
use qtale_quant::rtn::{fake_quantize, quantize_rtn};
use qtale_quant::{QuantConfig, QuantError};
use tch::{Kind, Tensor};

fn seed(s: i64) {
    tch::manual_seed(s);
}

fn cfg(bits: u32, group: usize) -> QuantConfig {
    QuantConfig::new(bits, group).unwrap()
}

/// A fixed mixing matrix `[d / 4, d]` defining one input distribution.
fn mixing(d: i64) -> Tensor {
    Tensor::randn([d / 4, d], (Kind::Float, tch::Device::Cpu))
}

/// Inputs with strongly correlated channels and a few outlier channels: `[n, d]`, drawn from the
/// distribution of `mix`.
fn correlated_inputs(n: i64, mix: &Tensor) -> Tensor {
    let d = mix.size()[1];
    let z = Tensor::randn([n, d / 4], (Kind::Float, tch::Device::Cpu));
    let noise = Tensor::randn([n, d], (Kind::Float, tch::Device::Cpu)) * 0.1;
    let chan = Tensor::ones([d], (Kind::Float, tch::Device::Cpu));
    let _ = chan.narrow(0, 0, 4).fill_(8.0);
    (z.matmul(mix) + noise) * chan
}

fn out_err(w: &Tensor, wq: &Tensor, x: &Tensor) -> f64 {
    (x.matmul(&(w - wq).transpose(0, 1)))
        .square()
        .mean(Kind::Float)
        .double_value(&[])
}

#[test]
fn rtn_dequantized_values_equal_the_formula() {
    seed(0);
    for (bits, group, sym) in [
        (4u32, 32usize, false),
        (3, 64, false),
        (2, 64, false),
        (8, 128, false),
        (4, 64, true),
    ] {
        let w = Tensor::randn([16, 256], (Kind::Float, tch::Device::Cpu));
        let c = QuantConfig {
            sym,
            ..cfg(bits, group)
        };
        let q = quantize_rtn(&w, &c, None).unwrap();
        q.validate().unwrap();
        let wv: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
        let dq: Vec<f32> = Vec::try_from(q.dequantize().view([-1])).unwrap();
        let codes: Vec<u8> = Vec::try_from(q.codes.view([-1])).unwrap();
        let maxq = ((1u32 << bits) - 1) as f32;
        for r in 0..16 {
            for gi in 0..256 / group {
                let grp = &wv[r * 256 + gi * group..r * 256 + (gi + 1) * group];
                // the reference's range: always including 0
                let (mn, mx) = grp
                    .iter()
                    .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                let (scale, zero) = if sym {
                    let a = mn.abs().max(mx.abs());
                    (a * (2.0 / maxq), ((maxq + 1.0) / 2.0).floor())
                } else {
                    let s = (mx - mn) / maxq;
                    (s, (-mn / s).round())
                };
                for j in 0..group {
                    let i = r * 256 + gi * group + j;
                    let code = ((wv[i] / scale).round() + zero).clamp(0.0, maxq);
                    assert_eq!(
                        codes[i] as f32, code,
                        "bits {bits} g {group} sym {sym}: code at {i}"
                    );
                    let want = scale * (code - zero);
                    assert!(
                        (dq[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "dequant at {i}: {} vs {want}",
                        dq[i]
                    );
                }
            }
        }
    }
    // the MSE clip grid never loses to plain min-max on the weight error
    let w = Tensor::randn([32, 128], (Kind::Float, tch::Device::Cpu));
    let plain = quantize_rtn(&w, &cfg(3, 64), None).unwrap().dequantize();
    let mse = quantize_rtn(
        &w,
        &QuantConfig {
            mse_clip: true,
            ..cfg(3, 64)
        },
        None,
    )
    .unwrap()
    .dequantize();
    let e = |q: &Tensor| (q - &w).square().sum(Kind::Float).double_value(&[]);
    assert!(
        e(&mse) <= e(&plain) * 1.0001,
        "mse clip {} vs plain {}",
        e(&mse),
        e(&plain)
    );
}

#[test]
fn gptq_beats_rtn_on_a_correlated_input_layer() {
    seed(1);
    tch::set_num_threads(1);
    let (out, d, n) = (64, 256, 2048);
    let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
    let mix = mixing(d);
    let x = correlated_inputs(n, &mix);
    let held_out = correlated_inputs(512, &mix);
    for bits in [3u32, 4] {
        let rtn = fake_quantize(&w, &cfg(bits, 64), None).unwrap();
        let e_rtn = out_err(&w, &rtn, &held_out);
        for (act_order, static_groups) in [(false, false), (true, false), (true, true)] {
            let c = QuantConfig {
                act_order,
                static_groups,
                block_size: 32,
                ..cfg(bits, 64)
            };
            let mut g = Gptq::new(d as usize, c, tch::Device::Cpu).unwrap();
            for chunk in x.split(512, 0) {
                g.add_batch(&chunk).unwrap();
            }
            let (q, rep) = g.solve(&w).unwrap();
            q.validate().unwrap();
            assert_eq!(rep.samples, n as usize);
            let e = out_err(&w, &q.dequantize(), &held_out);
            eprintln!("bits {bits} act_order {act_order} static {static_groups}: gptq {e:.4} rtn {e_rtn:.4} ({rep:?})");
            assert!(e < 0.7 * e_rtn, "GPTQ {e} vs RTN {e_rtn}");
            if act_order && !static_groups {
                assert!(!q.has_trivial_g_idx());
            } else {
                assert!(q.has_trivial_g_idx());
            }
        }
    }
}

#[test]
fn gptq_handles_dead_columns_and_escalates_damping() {
    seed(2);
    let d = 128;
    let w = Tensor::randn([32, d], (Kind::Float, tch::Device::Cpu));
    // column 5 never active; only 16 samples in 128 dims: a singular Hessian
    let x = Tensor::randn([16, d], (Kind::Float, tch::Device::Cpu));
    let _ = x.narrow(1, 5, 1).fill_(0.0);
    let c = QuantConfig {
        damp_percent: 1e-9,
        ..cfg(4, 64)
    };
    let mut g = Gptq::new(d as usize, c, tch::Device::Cpu).unwrap();
    g.add_batch(&x).unwrap();
    let (q, rep) = g.solve(&w).unwrap();
    assert_eq!(rep.dead_columns, 1);
    assert!(rep.damp >= 1e-9);
    eprintln!("{rep:?}");
    let dq = q.dequantize();
    assert!(dq.isfinite().all().int64_value(&[]) == 1);
    // no samples: a named error
    let empty = Gptq::new(d as usize, cfg(4, 64), tch::Device::Cpu).unwrap();
    assert!(matches!(empty.solve(&w), Err(QuantError::NoSamples)));
}

#[test]
fn awq_search_never_loses_to_rtn_and_clip_search_helps() {
    seed(3);
    let (out, d) = (64, 256);
    let mix = mixing(d);
    let x = correlated_inputs(1024, &mix);
    let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
    let c = cfg(3, 64);
    let y = x.matmul(&w.transpose(0, 1));
    let absmean = x.abs().mean_dim(0, false, Kind::Float);
    let res = search_scales(&absmean, &[&w], &c, |fq| {
        Ok((x.matmul(&fq[0].transpose(0, 1)) - &y)
            .square()
            .mean(Kind::Float)
            .double_value(&[]))
    })
    .unwrap();
    assert_eq!(res.losses.len(), ALPHA_GRID);
    let best = res.losses.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(best <= res.losses[0], "alpha 0 is plain RTN");
    assert!(
        best < 0.9 * res.losses[0],
        "scaling should help on outlier channels: {:?}",
        res.losses
    );
    // clip search on the scaled weight
    let s = res.tensor();
    let ws = &w * s.unsqueeze(0);
    let xs = &x / s.unsqueeze(0);
    let clip = search_clip(&ws, &xs.narrow(0, 0, 256), &c, 20, 0.5).unwrap();
    assert!(clip.ratios.iter().all(|&r| (0.5..=1.0).contains(&r)));
    let q_clip = quantize_rtn(&ws, &c, Some(&clip.tensor()))
        .unwrap()
        .dequantize()
        / s.unsqueeze(0);
    let q_plain = fake_quantize(&ws, &c, None).unwrap() / s.unsqueeze(0);
    let held = correlated_inputs(512, &mix);
    let (ec, ep) = (out_err(&w, &q_clip, &held), out_err(&w, &q_plain, &held));
    eprintln!("awq alpha {} clip {ec:.4} no clip {ep:.4}", res.alpha);
    assert!(ec <= ep * 1.02);
}

#[test]
fn gptq_layout_round_trips_and_rejects_malformed_checkpoints() {
    seed(4);
    let dir = tempfile::tempdir().unwrap();
    for (bits, group, act_order) in [
        (4u32, 64usize, false),
        (3, 64, true),
        (2, 32, false),
        (8, 128, false),
    ] {
        let (out, d) = (96i64, 256i64);
        let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
        let x = correlated_inputs(512, &mixing(d));
        let c = QuantConfig {
            act_order,
            ..cfg(bits, group)
        };
        let mut g = Gptq::new(d as usize, c.clone(), tch::Device::Cpu).unwrap();
        g.add_batch(&x).unwrap();
        let (q, _) = g.solve(&w).unwrap();
        let p = GptqPacked::from_quantized(&q).unwrap();
        // codes exactly, scales to f16 precision
        assert!(p.to_quantized().codes.equal(&q.codes));
        assert!(p.to_quantized().zeros.equal(&q.zeros));
        assert!(p.to_quantized().g_idx.equal(&q.g_idx));
        let rel = (p.dequantize() - q.dequantize())
            .abs()
            .max()
            .double_value(&[]);
        assert!(rel < 1e-2, "f16 scales: {rel}");
        let bpw = p.bits_per_weight();
        eprintln!("bits {bits} group {group}: {bpw:.3} bits per weight");
        assert!(bpw > bits as f64 && bpw < bits as f64 + 1.0);
        if bits == 4 && !act_order {
            let k = p.to_int4().expect("int4 kernel format");
            let kd = Tensor::from_slice(&k.dequantize()).view([out, d]);
            assert!(kd.equal(&p.dequantize()));
        }
        // file round trip
        let st = dir.path().join(format!("m{bits}.safetensors"));
        let norm = Tensor::randn([d], (Kind::Float, tch::Device::Cpu));
        save_safetensors(
            &st,
            PackedLayout::Gptq,
            &[("layer.q".into(), &p)],
            &[("layer.norm".into(), &norm)],
        )
        .unwrap();
        let gc = GptqQuantizationConfig::from_quant_config(&c);
        let qc = HfQuantizationConfig::from(gc.clone());
        let ck = Checkpoint::open(&st).unwrap();
        let back = ck.packed("layer.q", d as usize, out as usize, &qc).unwrap();
        assert_eq!(back, p);
        assert!(ck.dense("layer.norm").unwrap().equal(&norm));
        // malformed: wrong expected shape, missing tensor, unsupported bits
        assert!(matches!(
            ck.packed("layer.q", d as usize, 64, &qc),
            Err(QuantError::TensorShape { .. })
        ));
        assert!(matches!(
            ck.packed("layer.k", d as usize, out as usize, &qc),
            Err(QuantError::MissingTensor(_))
        ));
        let bad = GptqQuantizationConfig { bits: 5, ..gc }.into();
        assert!(matches!(
            ck.packed("layer.q", d as usize, out as usize, &bad),
            Err(QuantError::UnsupportedBits(5))
        ));
    }
    // a checkpoint without g_idx
    let w = Tensor::randn([32, 64], (Kind::Float, tch::Device::Cpu));
    let q = quantize_rtn(&w, &cfg(4, 32), None).unwrap();
    let p = GptqPacked::from_quantized(&q).unwrap();
    let st = dir.path().join("no_gidx.safetensors");
    let qw = Tensor::from_slice(&p.qweight).view([8, 32]);
    save_safetensors(&st, PackedLayout::Gptq, &[], &[("l.qweight".into(), &qw)]).unwrap();
    let ck = Checkpoint::open(&st).unwrap();
    let qc = GptqQuantizationConfig::from_quant_config(&cfg(4, 32)).into();
    // (`save_safetensors` writes dense tensors as f32: the qweight has the wrong dtype)
    assert!(matches!(
        ck.packed("l", 64, 32, &qc),
        Err(QuantError::TensorDtype { name, .. }) if name == "l.qweight"
    ));
    // config.json errors
    let cj = dir.path().join("config.json");
    std::fs::write(&cj, r#"{"hidden_size": 8}"#).unwrap();
    assert!(matches!(
        read_quantization_config(&cj),
        Err(QuantError::MissingQuantConfig { .. })
    ));
    std::fs::write(
        &cj,
        r#"{"quantization_config": {"quant_method": "gptq", "bits": 6, "group_size": 128}}"#,
    )
    .unwrap();
    assert!(matches!(
        read_quantization_config(&cj),
        Err(QuantError::UnsupportedBits(6))
    ));
    std::fs::write(
        &cj,
        r#"{"quantization_config": {"quant_method": "bitsandbytes", "bits": 4}}"#,
    )
    .unwrap();
    assert!(matches!(
        read_quantization_config(&cj),
        Err(QuantError::UnsupportedMethod(m)) if m == "bitsandbytes"
    ));
    std::fs::write(&cj, r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true}}"#).unwrap();
    let Ok(HfQuantizationConfig::Gptq(qc)) = read_quantization_config(&cj) else {
        panic!("a GPTQ config")
    };
    assert!(qc.desc_act && qc.sym && !qc.is_v2());
    for (field, json) in [
        ("checkpoint_format", r#""checkpoint_format": "marlin""#),
        ("lm_head", r#""lm_head": true"#),
    ] {
        std::fs::write(
            &cj,
            format!(
                r#"{{"quantization_config": {{"quant_method": "gptq", "bits": 4, "group_size": 128, {json}}}}}"#
            ),
        )
        .unwrap();
        assert!(
            matches!(
                read_quantization_config(&cj),
                Err(QuantError::UnsupportedOption { field: f, .. }) if f == field
            ),
            "{field}"
        );
    }
}

/// A GPTQ-v2 checkpoint stores the zero points themselves; loading converts them exactly.
#[test]
fn gptq_v2_zero_points_load_exactly() {
    seed(6);
    let w = Tensor::randn([64, 128], (Kind::Float, tch::Device::Cpu));
    let p = GptqPacked::from_quantized(&quantize_rtn(&w, &cfg(4, 32), None).unwrap()).unwrap();
    let zeros = p.zeros(); // [n_groups, out]
    let v2: Vec<i32> = zeros
        .chunks_exact(p.out_features)
        .flat_map(|row| qtale_quant::kernels::pack::pack_u32(row, 4).unwrap())
        .map(|w| w as i32)
        .collect();
    assert_ne!(v2, p.qzeros);
    let stored = |qzeros: Vec<i32>| StoredLinear {
        qweight: Some(Tensor::from_slice(&p.qweight).view([16, 64])),
        qzeros: Some(Tensor::from_slice(&qzeros).view([4, 8])),
        scales: Some(
            Tensor::from_slice(&p.scales.iter().map(|s| s.to_f32()).collect::<Vec<_>>())
                .view([4, 64])
                .to_kind(Kind::Half),
        ),
        g_idx: None,
    };
    let mut gc = GptqQuantizationConfig::from_quant_config(&cfg(4, 32));
    gc.checkpoint_format = Some("gptq_v2".into());
    let back = HfQuantizationConfig::from(gc.clone())
        .unpack("l", 128, 64, stored(v2))
        .unwrap();
    assert_eq!(back, p);
    gc.checkpoint_format = None; // absent means "gptq": stored minus one
    let back = HfQuantizationConfig::from(gc.clone())
        .unpack("l", 128, 64, stored(p.qzeros.clone()))
        .unwrap();
    assert_eq!(back, p);
    // without g_idx only when desc_act is false
    gc.desc_act = true;
    assert!(matches!(
        HfQuantizationConfig::from(gc).unpack("l", 128, 64, stored(p.qzeros.clone())),
        Err(QuantError::MissingTensor(n)) if n.contains("l.g_idx")
    ));
}

/// AutoAWQ "gemm" packing, written out by hand from its rule: nibble `i` of a word holds output
/// column `[0, 2, 4, 6, 1, 3, 5, 7][i]` of its eight; `qweight[in, out / 8]`, `qzeros[groups, out / 8]`.
#[test]
#[allow(clippy::needless_range_loop)] // w[o, i] against the q[i][o], z[g][o] tables
fn awq_layout_matches_the_autoawq_rule_on_known_integers() {
    // codes q[i][o] for 8 inputs x 8 outputs, and the words AutoAWQ's packer gives for each row
    let q: [[u8; 8]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [8, 9, 10, 11, 12, 13, 14, 15],
        [15, 14, 13, 12, 11, 10, 9, 8],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
        [3, 3, 3, 3, 3, 3, 3, 3],
    ];
    let words: [u32; 8] = [
        0x7531_6420, // nibbles (low first) 0,2,4,6,1,3,5,7
        0xFDB9_ECA8,
        0x8ACE_9BDF,
        0x0000_0001, // column 0 -> nibble 0
        0x0001_0000, // column 1 -> nibble 4
        0x0000_0010, // column 2 -> nibble 1
        0x1000_0000, // column 7 -> nibble 7
        0x3333_3333,
    ];
    // group size 4: two groups of input rows; zero points z[g][o]
    let z: [[u8; 8]; 2] = [[8; 8], [0, 0, 0, 1, 0, 0, 0, 0]];
    let zwords: [u32; 2] = [0x8888_8888, 0x0010_0000]; // column 3 -> nibble 5
    let scale = |g: usize, o: usize| 0.25 * (1 + o + 8 * g) as f32; // exact in f16
    let a = AwqTensors {
        in_features: 8,
        out_features: 8,
        group_size: 4,
        qweight: words.iter().map(|&w| w as i32).collect(),
        qzeros: zwords.iter().map(|&w| w as i32).collect(),
        scales: (0..2)
            .flat_map(|g| (0..8).map(move |o| half::f16::from_f32(scale(g, o))))
            .collect(),
    };
    let p = GptqPacked::from_awq(&a).unwrap();
    let dq = p.dequantize(); // [out, in]
    for o in 0..8 {
        for i in 0..8 {
            let g = i / 4;
            let want = scale(g, o) * (q[i][o] as f32 - z[g][o] as f32);
            let got = dq.double_value(&[o as i64, i as i64]) as f32;
            assert_eq!(got, want, "w[{o}, {i}]");
        }
    }
    // and back to exactly the same words
    assert_eq!(p.to_awq().unwrap(), a);
    // through a file and config.json
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("awq.safetensors");
    save_safetensors(&st, PackedLayout::Awq, &[("l".into(), &p)], &[]).unwrap();
    let cj = dir.path().join("config.json");
    std::fs::write(
        &cj,
        r#"{"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 4, "zero_point": true, "version": "gemm"}}"#,
    )
    .unwrap();
    let qc = read_quantization_config(&cj).unwrap();
    assert!(matches!(qc, HfQuantizationConfig::Awq(_)));
    let ck = Checkpoint::open(&st).unwrap();
    let mut names = ck.names();
    names.sort();
    assert_eq!(names, ["l.qweight", "l.qzeros", "l.scales"]);
    let qw = ck.tensor("l.qweight").unwrap().unwrap();
    assert_eq!(qw.size(), [8, 1]);
    assert_eq!(qw.int64_value(&[1, 0]) as i32, 0xFDB9_ECA8u32 as i32);
    assert_eq!(ck.packed("l", 8, 8, &qc).unwrap(), p);
}

#[test]
fn awq_layout_round_trips_and_rejects_malformed_checkpoints() {
    seed(7);
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = (48i64, 128i64);
    let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
    let c = cfg(4, 32);
    let p = GptqPacked::from_quantized(&quantize_rtn(&w, &c, None).unwrap()).unwrap();
    let a = p.to_awq().unwrap();
    assert_eq!((a.qweight.len(), a.qzeros.len()), (128 * 6, 4 * 6));
    assert_eq!(GptqPacked::from_awq(&a).unwrap(), p);
    let st = dir.path().join("m.safetensors");
    save_safetensors(&st, PackedLayout::Awq, &[("layer.q".into(), &p)], &[]).unwrap();
    let qc: HfQuantizationConfig = AwqQuantizationConfig::from_quant_config(&c).unwrap().into();
    let ck = Checkpoint::open(&st).unwrap();
    let back = ck.packed("layer.q", d as usize, out as usize, &qc).unwrap();
    assert_eq!(back, p);
    assert!(back.dequantize().equal(&p.dequantize()));
    // wrong expected shape, missing tensor
    assert!(matches!(
        ck.packed("layer.q", d as usize, 64, &qc),
        Err(QuantError::TensorShape { name, .. }) if name == "layer.q.qweight"
    ));
    assert!(matches!(
        ck.packed("layer.k", d as usize, out as usize, &qc),
        Err(QuantError::MissingTensor(n)) if n.contains("layer.k.qweight")
    ));
    // AWQ is 4-bit only, groups in order, and needs grouped configs
    assert!(matches!(
        AwqQuantizationConfig::from_quant_config(&cfg(3, 32)),
        Err(QuantError::UnsupportedBits(3))
    ));
    let w3 = Tensor::randn([64, d], (Kind::Float, tch::Device::Cpu));
    let p3 = GptqPacked::from_quantized(&quantize_rtn(&w3, &cfg(3, 32), None).unwrap()).unwrap();
    assert!(matches!(p3.to_awq(), Err(QuantError::UnsupportedBits(3))));
    let mut shuffled = p.clone();
    shuffled.g_idx.swap(0, 127);
    assert!(matches!(
        shuffled.to_awq(),
        Err(QuantError::UnsupportedOption { field, .. }) if field == "g_idx"
    ));
    let cj = dir.path().join("config.json");
    for (json, check) in [
        (
            r#""bits": 4, "group_size": 128, "version": "gemv""#,
            "version",
        ),
        (
            r#""bits": 4, "group_size": 128, "zero_point": false"#,
            "zero_point",
        ),
        (r#""bits": 8, "group_size": 128"#, "bits"),
    ] {
        std::fs::write(
            &cj,
            format!(r#"{{"quantization_config": {{"quant_method": "awq", {json}}}}}"#),
        )
        .unwrap();
        let r = read_quantization_config(&cj);
        match check {
            "bits" => assert!(matches!(r, Err(QuantError::UnsupportedBits(8)))),
            f => assert!(
                matches!(&r, Err(QuantError::UnsupportedOption { field, .. }) if field == f),
                "{f}: {r:?}"
            ),
        }
    }
}

/// One group of 64 weights per row: all positive in [0.5, 0.6], all negative in [-0.6, -0.5], mixed
/// in [-0.3, 0.5], and positive with a wide spread in [0.01, 2.0].
fn one_sided_rows() -> Tensor {
    let lin = |a: f64, b: f64| Tensor::linspace(a, b, 64, (Kind::Float, tch::Device::Cpu));
    // a fixed shuffle so that the groups are not sorted
    let perm = Tensor::from_slice(&(0..64).map(|i| (i * 37) % 64).collect::<Vec<i64>>());
    Tensor::stack(
        &[
            lin(0.5, 0.6),
            lin(-0.6, -0.5),
            lin(-0.3, 0.5),
            lin(0.01, 2.0),
        ],
        0,
    )
    .index_select(1, &perm)
}

/// Max |w - Q(w)| of each row.
fn row_max_err(w: &Tensor, q: &Tensor) -> Vec<f64> {
    let e = (w - q).abs().amax(1, false);
    Vec::<f32>::try_from(e)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The reference's quantizer (IST-DASLab/gptq `quant.py`) includes 0 in every group's range, so a
/// one-sided group keeps a usable grid: at 4 bits the step of [0.5, 0.6] is 0.6 / 15 = 0.04 and the
/// error at most half a step, 0.02. Min-max without 0 put its zero point at round(-0.5 / step) < 0,
/// clamped to 0, and every weight dequantized to 15 * step = 0.1 (error 0.5).
#[test]
fn one_sided_groups_keep_a_grid_for_rtn_and_gptq() {
    tch::set_num_threads(1);
    let w = one_sided_rows();
    // half a step of the reference's grid: (max(max, 0) - min(min, 0)) / 15 / 2
    let half_step = [0.6 / 30.0, 0.6 / 30.0, 0.8 / 30.0, 2.0 / 30.0];
    let c = cfg(4, 64);
    let rtn = quantize_rtn(&w, &c, None).unwrap();
    rtn.validate().unwrap();
    let e_rtn = row_max_err(&w, &rtn.dequantize());
    // GPTQ with a diagonal Hessian (orthogonal inputs: nothing to compensate) is RTN exactly
    let eye = Tensor::eye(64, (Kind::Float, tch::Device::Cpu));
    let mut g = Gptq::new(64, c.clone(), tch::Device::Cpu).unwrap();
    g.add_batch(&(eye * 3.0)).unwrap();
    let gq = g.solve(&w).unwrap().0;
    assert!(
        gq.codes.equal(&rtn.codes),
        "GPTQ with H = cI must equal RTN"
    );
    // GPTQ with correlated inputs: the compensation moves weights by more than half a step, but the
    // grid still spans the group (a collapse onto one code errs by 0.5 on the one-sided rows)
    seed(11);
    let x = correlated_inputs(1024, &mixing(64));
    let mut g = Gptq::new(64, c.clone(), tch::Device::Cpu).unwrap();
    g.add_batch(&x).unwrap();
    let gc = g.solve(&w).unwrap().0;
    let e_gptq = row_max_err(&w, &gc.dequantize());
    for (r, what) in ["[0.5, 0.6]", "[-0.6, -0.5]", "mixed", "[0.01, 2]"]
        .iter()
        .enumerate()
    {
        eprintln!(
            "{what}: RTN max err {:.4}, GPTQ {:.4} (half step {:.4})",
            e_rtn[r], e_gptq[r], half_step[r]
        );
        assert!(
            e_rtn[r] <= half_step[r] * 1.0001,
            "RTN {what}: max error {} > half a step {}",
            e_rtn[r],
            half_step[r]
        );
        assert!(
            e_gptq[r] <= 8.0 * half_step[r],
            "GPTQ {what}: max error {} (half a step {})",
            e_gptq[r],
            half_step[r]
        );
    }
    // the zero points follow the reference's rule (and sit at the ends for one-sided groups)
    let z: Vec<f32> = Vec::try_from(rtn.zeros.view([-1])).unwrap();
    assert_eq!(z, [0.0, 15.0, 6.0, 0.0]);
    // symmetric: an all-positive group keeps its full range too (the reference halves it there)
    let sym = QuantConfig {
        sym: true,
        ..cfg(4, 64)
    };
    let e_sym = row_max_err(&w, &fake_quantize(&w, &sym, None).unwrap());
    for (r, &mx) in [0.6, 0.6, 0.5, 2.0].iter().enumerate() {
        // step 2 max|w| / 15; the top code is 7 steps above the zero point: max|w| * 14/15
        let step: f64 = 2.0 * mx / 15.0;
        assert!(
            e_sym[r] <= step * 1.0001,
            "sym row {r}: {} > {step}",
            e_sym[r]
        );
    }
}

/// 576 inputs at group 128 (SmolLM2's width): four groups of 128 and a ragged fifth of 64, each
/// quantized as if on its own, as the reference does (`find_params(W[:, i:i + 128])`).
#[test]
fn ragged_last_group_rtn_equals_the_groups_quantized_alone() {
    seed(12);
    let w = Tensor::randn([24, 576], (Kind::Float, tch::Device::Cpu));
    for mse_clip in [false, true] {
        let c = QuantConfig {
            mse_clip,
            ..cfg(3, 128)
        };
        let q = quantize_rtn(&w, &c, None).unwrap();
        q.validate().unwrap();
        assert_eq!((q.n_groups(), q.group_size), (5, 128));
        assert!(q.has_trivial_g_idx());
        assert_eq!(q.g_idx.int64_value(&[575]), 4);
        let head = quantize_rtn(&w.narrow(1, 0, 512), &c, None).unwrap();
        let tail = quantize_rtn(
            &w.narrow(1, 512, 64),
            &QuantConfig {
                mse_clip,
                ..cfg(3, 64)
            },
            None,
        )
        .unwrap();
        assert!(q.codes.narrow(1, 0, 512).equal(&head.codes));
        assert!(
            q.codes.narrow(1, 512, 64).equal(&tail.codes),
            "mse {mse_clip}"
        );
        assert!(
            q.scales.narrow(1, 4, 1).equal(&tail.scales),
            "mse {mse_clip}"
        );
        assert!(q.zeros.narrow(1, 0, 4).equal(&head.zeros));
        // the dequantized weight and the fake quantization agree
        let fq = fake_quantize(&w, &c, None).unwrap();
        if !mse_clip {
            assert!(fq.allclose(&q.dequantize(), 1e-6, 1e-6, false));
        }
    }
    // a group wider than the weight: one group, the whole row
    let whole = quantize_rtn(&w.narrow(1, 0, 96), &cfg(4, 128), None).unwrap();
    let per_row = quantize_rtn(&w.narrow(1, 0, 96), &cfg(4, 0), None).unwrap();
    assert!(whole.codes.equal(&per_row.codes) && whole.scales.equal(&per_row.scales));
    // clip ratios are per (row, ceil(in / group)) group
    let clip = Tensor::full([24, 5], 0.9, (Kind::Float, tch::Device::Cpu));
    assert!(quantize_rtn(&w, &cfg(4, 128), Some(&clip)).is_ok());
    assert!(matches!(
        quantize_rtn(&w, &cfg(4, 128), Some(&clip.narrow(1, 0, 4))),
        Err(QuantError::Shape(_))
    ));
}

/// GPTQ with a ragged last group, plain, act-order and static groups: the groups the solver used
/// are recorded consistently (`g_idx`, scales), the static groups' parameters are those of the
/// original weight's column ranges, and GPTQ still beats RTN.
#[test]
fn ragged_last_group_gptq_plain_act_order_and_static() {
    seed(13);
    tch::set_num_threads(1);
    let (out, d) = (48i64, 576i64);
    let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
    let mix = mixing(d);
    let x = correlated_inputs(2048, &mix);
    let held = correlated_inputs(512, &mix);
    let e_rtn = out_err(&w, &fake_quantize(&w, &cfg(4, 128), None).unwrap(), &held);
    for (act_order, static_groups) in [(false, false), (true, false), (true, true)] {
        let what = format!("act_order {act_order} static {static_groups}");
        let c = QuantConfig {
            act_order,
            static_groups,
            ..cfg(4, 128)
        };
        let mut g = Gptq::new(d as usize, c, tch::Device::Cpu).unwrap();
        g.add_batch(&x).unwrap();
        let q = g.solve(&w).unwrap().0;
        q.validate().unwrap();
        assert_eq!(q.n_groups(), 5, "{what}");
        // group sizes as g_idx records them: four of 128 and one of 64
        let mut sizes = vec![0usize; 5];
        for gi in Vec::<i64>::try_from(&q.g_idx).unwrap() {
            sizes[gi as usize] += 1;
        }
        sizes.sort();
        assert_eq!(sizes, [64, 128, 128, 128, 128], "{what}");
        assert_eq!(q.has_trivial_g_idx(), !act_order || static_groups, "{what}");
        if static_groups {
            // parameters of the original weight's column ranges, ragged tail included
            let tail = quantize_rtn(&w.narrow(1, 512, 64), &cfg(4, 64), None).unwrap();
            assert!(q.scales.narrow(1, 4, 1).equal(&tail.scales), "{what}");
            assert!(q.zeros.narrow(1, 4, 1).equal(&tail.zeros), "{what}");
        }
        let e = out_err(&w, &q.dequantize(), &held);
        eprintln!("ragged g128 {what}: GPTQ {e:.4} vs RTN {e_rtn:.4}");
        assert!(e < 0.7 * e_rtn, "{what}: GPTQ {e} vs RTN {e_rtn}");
    }
}

/// The packed GPTQ layout with a ragged last group: `scales`/`qzeros` have ceil(in / group) rows,
/// the file round trip is exact, the int4 kernel takes it (64 = two blocks), and AutoAWQ's layout,
/// which requires in % group == 0, refuses it by name.
#[test]
fn ragged_last_group_packs_saves_loads_and_runs_in_the_int4_kernel() {
    seed(14);
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = (64i64, 576i64);
    let w = Tensor::randn([out, d], (Kind::Float, tch::Device::Cpu));
    for (bits, act_order) in [(4u32, false), (4, true), (3, false)] {
        let c = QuantConfig {
            act_order,
            ..cfg(bits, 128)
        };
        let mut g = Gptq::new(d as usize, c.clone(), tch::Device::Cpu).unwrap();
        g.add_batch(&correlated_inputs(1024, &mixing(d))).unwrap();
        let q = g.solve(&w).unwrap().0;
        let p = GptqPacked::from_quantized(&q).unwrap();
        assert_eq!((p.n_groups(), p.scales.len()), (5, 5 * out as usize));
        assert!(p.to_quantized().codes.equal(&q.codes));
        let st = dir.path().join(format!("r{bits}{act_order}.safetensors"));
        save_safetensors(&st, PackedLayout::Gptq, &[("l".into(), &p)], &[]).unwrap();
        let ck = Checkpoint::open(&st).unwrap();
        assert_eq!(ck.tensor("l.scales").unwrap().unwrap().size(), [5, out]);
        assert_eq!(
            ck.tensor("l.qzeros").unwrap().unwrap().size(),
            [5, out * bits as i64 / 32]
        );
        let qc = GptqQuantizationConfig::from_quant_config(&c).into();
        let back = ck.packed("l", d as usize, out as usize, &qc).unwrap();
        assert_eq!(back, p);
        // transformers/optimum without g_idx: i / group_size, ragged tail included
        if !act_order {
            let stored = StoredLinear {
                qweight: ck.tensor("l.qweight").unwrap(),
                qzeros: ck.tensor("l.qzeros").unwrap(),
                scales: ck.tensor("l.scales").unwrap(),
                g_idx: None,
            };
            let qc2: HfQuantizationConfig = GptqQuantizationConfig::from_quant_config(&c).into();
            assert_eq!(
                qc2.unpack("l", d as usize, out as usize, stored).unwrap(),
                p
            );
        }
        match (bits, act_order) {
            (4, false) => {
                let k = p.to_int4().expect("int4 kernel takes a ragged group of 64");
                let kd = Tensor::from_slice(&k.dequantize()).view([out, d]);
                assert!(kd.equal(&p.dequantize()));
                let x: Vec<f32> = (0..2 * d)
                    .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                    .collect();
                let mut y = vec![0f32; 2 * out as usize];
                k.gemm(&x, 2, &mut y).unwrap();
                let want = Tensor::from_slice(&x)
                    .view([2, d])
                    .matmul(&p.dequantize().transpose(0, 1));
                let got = Tensor::from_slice(&y).view([2, out]);
                let nmse = (&got - &want).square().sum(Kind::Float).double_value(&[])
                    / want.square().sum(Kind::Float).double_value(&[]);
                assert!(nmse < 1e-3, "int4 kernel on a ragged group: NMSE {nmse}");
                let e = p.to_awq().unwrap_err();
                assert!(
                    matches!(&e, QuantError::UnsupportedOption { field, .. } if field == "group_size"),
                    "{e}"
                );
                assert!(
                    save_safetensors(&st, PackedLayout::Awq, &[("l".into(), &p)], &[]).is_err()
                );
                let awq: HfQuantizationConfig =
                    AwqQuantizationConfig::from_quant_config(&c).unwrap().into();
                let e = awq
                    .unpack("l", d as usize, out as usize, StoredLinear::default())
                    .unwrap_err();
                assert!(
                    matches!(&e, QuantError::UnsupportedOption { field, value, .. } if field == "group_size" && value.contains("l")),
                    "{e}"
                );
            }
            _ => assert!(p.to_int4().is_none()),
        }
    }
}
