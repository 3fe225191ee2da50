//! Readers for the formats the benchmark data comes in, all decoded into JSON-like rows:
//!
//! * Arrow IPC **stream** files (what HF `datasets.save_to_disk` writes, `data-00000-of-00001.arrow`);
//! * Parquet files (the hub's `refs/convert/parquet` and most dataset repos);
//! * gzip JSONL (OLMES `requests.jsonl.gz`), and plain JSONL.
//!
//! Every row remembers its file and index, so a malformed row gives an error naming file, row and field.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{self as dt, DataType};
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Number, Value};

use crate::error::{EvalError, Result};

/// One decoded row with its provenance.
#[derive(Debug, Clone)]
pub struct Row {
    pub path: Arc<PathBuf>,
    /// 0-based index of the row (the line for JSONL) in its file.
    pub row: usize,
    pub value: Map<String, Value>,
}

impl Row {
    pub fn err(&self, field: &str, msg: impl Into<String>) -> EvalError {
        EvalError::field(self.path.as_ref().clone(), self.row, field, msg)
    }

    /// The value at a dotted path (`choices.text`, `doc.query`).
    pub fn get(&self, field: &str) -> Result<&Value> {
        let mut parts = field.split('.');
        let first = parts.next().unwrap_or(field);
        let mut v = self
            .value
            .get(first)
            .ok_or_else(|| self.err(field, "missing"))?;
        for p in parts {
            v = v
                .as_object()
                .and_then(|o| o.get(p))
                .ok_or_else(|| self.err(field, "missing"))?;
        }
        Ok(v)
    }

    pub fn has(&self, field: &str) -> bool {
        self.get(field).is_ok()
    }

    pub fn str(&self, field: &str) -> Result<&str> {
        let v = self.get(field)?;
        v.as_str()
            .ok_or_else(|| self.err(field, format!("expected a string, got {}", kind_of(v))))
    }

    /// An integer, also accepted as a decimal string (`"1"`, as several HF datasets store labels).
    pub fn int(&self, field: &str) -> Result<i64> {
        let v = self.get(field)?;
        match v {
            Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or_default()),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map_err(|_| self.err(field, format!("expected an integer, got the string {s:?}"))),
            _ => Err(self.err(field, format!("expected an integer, got {}", kind_of(v)))),
        }
    }

    pub fn bool(&self, field: &str) -> Result<bool> {
        let v = self.get(field)?;
        v.as_bool()
            .ok_or_else(|| self.err(field, format!("expected a boolean, got {}", kind_of(v))))
    }

    pub fn str_list(&self, field: &str) -> Result<Vec<String>> {
        let v = self.get(field)?;
        let a = v
            .as_array()
            .ok_or_else(|| self.err(field, format!("expected a list, got {}", kind_of(v))))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    self.err(
                        field,
                        format!("element {i}: expected a string, got {}", kind_of(x)),
                    )
                })
            })
            .collect()
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The on-disk formats we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    ArrowStream,
    Parquet,
    JsonlGz,
    Jsonl,
}

impl Format {
    /// Chosen by file name: `.arrow`, `.parquet`, `.jsonl.gz` / `.json.gz`, `.jsonl`.
    pub fn of_path(path: &Path) -> Result<Format> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.ends_with(".arrow") {
            Ok(Format::ArrowStream)
        } else if name.ends_with(".parquet") {
            Ok(Format::Parquet)
        } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
            Ok(Format::JsonlGz)
        } else if name.ends_with(".jsonl") {
            Ok(Format::Jsonl)
        } else {
            Err(EvalError::Format {
                path: path.to_path_buf(),
                msg: "unknown data format (expected .arrow, .parquet, .jsonl.gz or .jsonl)".into(),
            })
        }
    }
}

/// Read every row of a data file, the format chosen by its name.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    match Format::of_path(path)? {
        Format::ArrowStream => read_arrow_stream(path),
        Format::Parquet => read_parquet(path),
        Format::JsonlGz => read_jsonl(path, true),
        Format::Jsonl => read_jsonl(path, false),
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> EvalError {
    EvalError::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// An Arrow IPC stream file (HF `save_to_disk`).
pub fn read_arrow_stream(path: &Path) -> Result<Vec<Row>> {
    let reader = arrow::ipc::reader::StreamReader::try_new(BufReader::new(open(path)?), None)
        .map_err(|e| format_err(path, format!("not an Arrow IPC stream: {e}")))?;
    let mut rows = Vec::new();
    let p = Arc::new(path.to_path_buf());
    for batch in reader {
        let batch = batch
            .map_err(|e| format_err(path, format!("Arrow batch after row {}: {e}", rows.len())))?;
        batch_rows(&p, &batch, &mut rows)?;
    }
    Ok(rows)
}

/// A Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open(path)?)
            .map_err(|e| format_err(path, format!("not a Parquet file: {e}")))?;
    let reader = builder
        .build()
        .map_err(|e| format_err(path, format!("Parquet reader: {e}")))?;
    let mut rows = Vec::new();
    let p = Arc::new(path.to_path_buf());
    for batch in reader {
        let batch = batch.map_err(|e| {
            format_err(path, format!("Parquet batch after row {}: {e}", rows.len()))
        })?;
        batch_rows(&p, &batch, &mut rows)?;
    }
    Ok(rows)
}

/// JSON lines, optionally gzip-compressed; empty lines are skipped (their numbers still count).
pub fn read_jsonl(path: &Path, gz: bool) -> Result<Vec<Row>> {
    let file = open(path)?;
    let reader: Box<dyn BufRead> = if gz {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let p = Arc::new(path.to_path_buf());
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format_err(path, format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| EvalError::field(path, i, "<json>", format!("invalid JSON: {e}")))?;
        match v {
            Value::Object(m) => rows.push(Row {
                path: p.clone(),
                row: i,
                value: m,
            }),
            _ => {
                return Err(EvalError::field(
                    path,
                    i,
                    "<json>",
                    "expected a JSON object per line",
                ))
            }
        }
    }
    Ok(rows)
}

fn batch_rows(path: &Arc<PathBuf>, batch: &RecordBatch, out: &mut Vec<Row>) -> Result<()> {
    let schema = batch.schema();
    let base = out.len();
    for i in 0..batch.num_rows() {
        let mut m = Map::new();
        for (f, col) in schema.fields().iter().zip(batch.columns()) {
            let v = arrow_value(col.as_ref(), i)
                .map_err(|msg| EvalError::field(path.as_ref().clone(), base + i, f.name(), msg))?;
            m.insert(f.name().clone(), v);
        }
        out.push(Row {
            path: path.clone(),
            row: base + i,
            value: m,
        });
    }
    Ok(())
}

fn num<T: Into<Number>>(x: T) -> Value {
    Value::Number(x.into())
}

/// One cell of an Arrow array as JSON (strings, booleans, integers, floats, lists and structs).
fn arrow_value(a: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num(a.as_primitive::<dt::Int8Type>().value(i)),
        DataType::Int16 => num(a.as_primitive::<dt::Int16Type>().value(i)),
        DataType::Int32 => num(a.as_primitive::<dt::Int32Type>().value(i)),
        DataType::Int64 => num(a.as_primitive::<dt::Int64Type>().value(i)),
        DataType::UInt8 => num(a.as_primitive::<dt::UInt8Type>().value(i)),
        DataType::UInt16 => num(a.as_primitive::<dt::UInt16Type>().value(i)),
        DataType::UInt32 => num(a.as_primitive::<dt::UInt32Type>().value(i)),
        DataType::UInt64 => num(a.as_primitive::<dt::UInt64Type>().value(i)),
        DataType::Float32 => float(a.as_primitive::<dt::Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<dt::Float64Type>().value(i)),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(_) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (name, col) in s.column_names().into_iter().zip(s.columns()) {
                m.insert(name.to_string(), arrow_value(col.as_ref(), i)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported Arrow type {other}")),
    })
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn list(a: &dyn Array) -> std::result::Result<Value, String> {
    (0..a.len())
        .map(|j| arrow_value(a, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}
