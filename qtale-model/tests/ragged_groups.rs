//! Group 128 on SmolLM2 (576-wide inputs: 4 x 128 + a ragged 64), end to end: RTN and GPTQ (plain,
//! act-order, static groups), the packed HF GPTQ directory written and read back with identical
//! logits, the int4 kernel serving the ragged layers, and AutoAWQ's layout refusing them by name.
use qtale_model::corpus::calibration_windows;
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_model::quantized_io::{load_quantized_hf_dir, save_quantized_hf_dir};
use qtale_model::{load_model, ModelError, ModelSource};
use qtale_quant::method::quantizer;
use qtale_quant::packed::PackedLayout;
use qtale_quant::{QuantConfig, QuantError};
use tch::{Device, Kind, Tensor};

#[test]
fn group_128_on_smollm2_quantizes_saves_loads_and_runs_the_int4_kernel() {
    let Some(gguf) = qtale_model::load::test_asset_gguf() else {
        return;
    };
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let src = ModelSource::Gguf(gguf);
    let lm = load_model(&src, Device::Cpu, Kind::Float).unwrap();
    let calib = calibration_windows(&lm.tokenizer, 4, 64).unwrap();
    let ids = Tensor::from_slice(&calib[0][..12]).view([1, -1]);
    for (method, act_order, static_groups) in [
        ("rtn", false, false),
        ("gptq", false, false),
        ("gptq", true, true),
        ("gptq", true, false),
    ] {
        let what = format!("{method} act_order {act_order} static {static_groups}");
        let mut model = load_model(&src, Device::Cpu, Kind::Float).unwrap().model;
        let config = QuantConfig {
            act_order,
            static_groups,
            ..QuantConfig::new(4, 128).unwrap()
        };
        let o = PtqOptions {
            max_layers: Some(2),
            batch: 2,
            ..PtqOptions::default()
        };
        let m = quantizer(method, &serde_json::Value::Null).unwrap();
        let s = quantize_model(&mut model, &calib, m.as_ref(), &config, &o).unwrap();
        assert_eq!(s.packed.len(), 14, "{what}");
        for (name, p) in &s.packed {
            // 576 inputs: 5 groups (the last of 64); down_proj's 1536: 12
            let want = if p.in_features == 576 { 5 } else { 12 };
            assert_eq!(p.n_groups(), want, "{what}: {name}");
            // the kernel takes in-order groups, ragged ones included; act-order's permuted
            // groups run dequantized
            assert_eq!(
                p.to_int4().is_some(),
                !act_order || static_groups,
                "{what}: {name}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        save_quantized_hf_dir(&model, &s, dir.path(), PackedLayout::Gptq).unwrap();
        let back = load_quantized_hf_dir(dir.path(), Device::Cpu, Kind::Float, false).unwrap();
        // 6 tokens go through the int4 kernel (where it applies), 12 through dequantize + matmul
        for len in [6, 12] {
            let x = ids.narrow(1, 0, len);
            let a = model.forward(&x, None).unwrap().logits;
            let b = back.forward(&x, None).unwrap().logits;
            assert!(
                a.equal(&b),
                "{what}, {len} tokens: save -> load changed the logits"
            );
        }
        // the int4 kernel on each ragged linear vs its dequantized weight: the kernel rounds the
        // activations to int8 (step at most amax / 127 per group), so each output may differ by
        // at most step / 2 * sum_j |W_ij| (plus f32 rounding)
        tch::manual_seed(3);
        let x = Tensor::randn([2, 576], (Kind::Float, Device::Cpu));
        let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
        let step = x.abs().max().double_value(&[]) / 127.0;
        for (name, p) in s.packed.iter().filter(|(_, p)| p.in_features == 576) {
            let Some(k) = p.to_int4() else { continue };
            let w = p.dequantize();
            let mut y = vec![0f32; 2 * p.out_features];
            k.gemm(&xs, 2, &mut y).unwrap();
            let y = Tensor::from_slice(&y).view([2, -1]);
            let want = x.matmul(&w.transpose(0, 1));
            let bound =
                w.abs().sum_dim_intlist(1, false, Kind::Float) * (0.5 * step * 1.001) + 1e-5;
            let over = (&y - &want)
                .abs()
                .gt_tensor(&bound.unsqueeze(0))
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(
                over, 0,
                "{what}: {name}: int4 kernel beyond the int8 rounding bound"
            );
        }
        // AutoAWQ's gemm layout needs in % group == 0
        let e = save_quantized_hf_dir(
            &model,
            &s,
            tempfile::tempdir().unwrap().path(),
            PackedLayout::Awq,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                ModelError::Quant(QuantError::UnsupportedOption { field, .. }) if field == "group_size"
            ) || (act_order && !static_groups),
            "{what}: {e}"
        );
    }
}
