//! `yiqiao mpi import` files: CSV (first byte even) or NDJSON (odd), read, mapped and validated
//! row by row exactly as the import does, without the registry.
#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use yiqiao_gateway::mpi_import::{ImportFormat, ImportOptions, check_rows};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("yiqiao-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("input");
    {
        let mut f = std::fs::File::create(&file).expect("temp file");
        f.write_all(body).expect("write temp file");
    }
    let opts = ImportOptions {
        file: file.clone(),
        format: if selector % 2 == 0 {
            ImportFormat::Csv
        } else {
            ImportFormat::Ndjson
        },
        batch: 100,
        rejects: dir.join("rejects"),
        checkpoint: dir.join("checkpoint"),
        restart: true,
        progress: false,
        columns: BTreeMap::new(),
        resident_system: common::RESIDENT_SYSTEM.into(),
    };
    let _ = check_rows(&opts, common::institution());
});
