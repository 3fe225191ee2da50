//! Router analysis, D-LLM vs QTALE: histograms of the router logit gap (execute - skip), Gumbel flip
//! rates and execution ratios per layer, on calibration text (never evaluation docs). The trained
//! routers come from the cells of `experiments/configs/router-analysis.toml` (cached training stage,
//! shared with the other experiments when their training configs match).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;

use experiments::cell::build_model;
use experiments::grid::{config_path, env_of, to_cell_with, ExperimentArgs, ExperimentFile};
use experiments::plot;
use qtale_router::{analyze, AnalysisOptions, RouterAnalysis};

#[derive(Parser, Debug)]
#[command(
    version,
    name = "router-analysis",
    about = "Router logit-gap histograms, Gumbel flip rates and per-layer execution ratios, D-LLM vs QTALE"
)]
struct Cli {
    #[command(flatten)]
    grid: ExperimentArgs,
    /// Histogram bins over the logit-gap range (>= 1).
    #[arg(long, default_value_t = 60, value_parser = experiments::args::positive())]
    bins: usize,
    /// Gumbel samples per token for the sampled flip rate (>= 1).
    #[arg(long, default_value_t = 16, value_parser = experiments::args::positive())]
    samples: usize,
}

#[derive(Serialize)]
struct Row {
    name: String,
    theta: f64,
    exec_ratio: f64,
    per_layer_ratio: Vec<f64>,
    analysis: RouterAnalysis,
}

fn main() -> Result<()> {
    let a = Cli::parse();
    let binary = "router-analysis";
    experiments::signals::install()?;
    let file = ExperimentFile::read(&config_path(&a.grid, binary))?;
    let env = env_of(&a.grid, binary)?;
    std::fs::create_dir_all(&env.out).with_context(|| format!("creating {}", env.out.display()))?;
    let mut rows = Vec::new();
    for v in file.expand()? {
        let cell = to_cell_with(v, &a.grid, None)?;
        if a.grid.list {
            println!("{}", cell.name);
            continue;
        }
        let built = build_model(&cell, &env)?;
        let Some(r) = built.routed(&cell, &env)? else {
            println!("cell `{}` has no router; skipped", cell.name);
            continue;
        };
        let (mut routed, theta, batches) = (r.model, r.theta, r.batches);
        let point = theta.report.chosen.clone().context("no theta chosen")?;
        let (_, summary) = qtale_router::measure(&mut routed, &batches, point.theta)?;
        let opts = AnalysisOptions {
            bins: a.bins,
            range: (-12.0, 12.0),
            samples: a.samples,
            seed: 0,
        };
        let analysis = analyze(&routed, &batches, &opts)?;
        println!(
            "{:<24} theta {:.3} ratio {:.3}  mean |gap| {:.3}  flip rate {:.4} (expected {:.4})",
            cell.name,
            point.theta,
            summary.ratio(),
            mean(analysis.layers.iter().map(|l| l.mean_abs_gap)),
            mean(analysis.layers.iter().map(|l| l.flip_rate)),
            mean(analysis.layers.iter().map(|l| l.expected_flip_rate)),
        );
        rows.push(Row {
            name: cell.name.clone(),
            theta: point.theta,
            exec_ratio: summary.ratio(),
            per_layer_ratio: summary.layer_ratio(),
            analysis,
        });
    }
    if a.grid.list {
        return Ok(());
    }
    let out = |f: &str| -> PathBuf { env.out.join(f) };
    // Pooled logit-gap histogram per router (bin centers weighted by counts, re-binned by plot).
    let gaps: Vec<(String, Vec<f64>)> = rows
        .iter()
        .map(|r| {
            let mut v = Vec::new();
            for l in &r.analysis.layers {
                for (i, &c) in l.counts.iter().enumerate() {
                    let center = 0.5 * (l.edges[i] + l.edges[i + 1]);
                    v.extend(std::iter::repeat_n(center, c as usize));
                }
            }
            (r.name.clone(), v)
        })
        .collect();
    plot::histograms(
        &out("logit_gap_hist.svg"),
        "router logit gap (execute - skip), routed layers pooled",
        "logit gap",
        &gaps,
        a.bins,
    )?;
    let per_layer = |f: &dyn Fn(&Row) -> Vec<(f64, f64)>| -> Vec<(String, Vec<(f64, f64)>)> {
        rows.iter().map(|r| (r.name.clone(), f(r))).collect()
    };
    plot::lines(
        &out("flip_rate_per_layer.svg"),
        "Gumbel flip rate per layer",
        "layer",
        "flip rate",
        &per_layer(&|r| {
            r.analysis
                .layers
                .iter()
                .map(|l| (l.layer as f64, l.flip_rate))
                .collect()
        }),
    )?;
    plot::lines(
        &out("exec_ratio_per_layer.svg"),
        "execution ratio per layer",
        "layer",
        "execution ratio",
        &per_layer(&|r| {
            r.per_layer_ratio
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as f64, x))
                .collect()
        }),
    )?;
    let mut w = csv::Writer::from_path(out("router_analysis.csv"))?;
    w.write_record([
        "variant",
        "layer",
        "tokens",
        "exec_ratio",
        "mean_gap",
        "mean_abs_gap",
        "flip_rate",
        "expected_flip_rate",
    ])?;
    for r in &rows {
        for l in &r.analysis.layers {
            w.write_record([
                r.name.clone(),
                l.layer.to_string(),
                l.tokens.to_string(),
                format!(
                    "{:.6}",
                    r.per_layer_ratio.get(l.layer).copied().unwrap_or(f64::NAN)
                ),
                format!("{:.6}", l.mean_gap),
                format!("{:.6}", l.mean_abs_gap),
                format!("{:.6}", l.flip_rate),
                format!("{:.6}", l.expected_flip_rate),
            ])?;
        }
    }
    w.flush()?;
    let json = serde_json::json!({"experiment": file, "provenance": env.provenance(),
        "routers": rows});
    std::fs::write(
        out("router_analysis.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!(
        "wrote {}/{{logit_gap_hist,flip_rate_per_layer,exec_ratio_per_layer}}.svg, router_analysis.csv, router_analysis.json",
        env.out.display()
    );
    Ok(())
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
