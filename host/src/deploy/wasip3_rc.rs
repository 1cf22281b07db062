//! WASIp3 release-candidate components, served as WASIp3 0.3.0 ones. Spin 4 (and the
//! toolchains of its time) build components against `wasi:*@0.3.0-rc-2026-03-15`, whose
//! interfaces are the same as 0.3.0's item for item; only the version strings differ.
//! Such a component's top-level import and export names are rewritten to `@0.3.0` before
//! it is compiled, so that it links against the node's p3 implementation.
//!
//! This is sound because everything inside a component refers to its imports and exports
//! by index, never by name, and linking still checks every imported function and
//! resource structurally: a component that used a real rc difference would fail to link
//! at deploy, naming the import, rather than misbehave. Older release candidates differ
//! in substance and are left alone (they fail to link, naming what is missing).

use wasmparser::{
    BinaryReader, ComponentExportSectionReader, ComponentExternName, ComponentImportSectionReader,
    Parser,
};

const RC: &str = "@0.3.0-rc-2026-03-15";
const FINAL: &str = "@0.3.0";
const PACKAGES: [&str; 6] = [
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:http/",
    "wasi:random/",
    "wasi:sockets/",
];
/// Component section ids.
const IMPORT_SECTION: u8 = 10;
const EXPORT_SECTION: u8 = 11;

fn final_name(name: &str) -> Option<String> {
    let base = name.strip_suffix(RC)?;
    PACKAGES
        .iter()
        .any(|package| base.starts_with(package))
        .then(|| format!("{base}{FINAL}"))
}

fn leb128(out: &mut Vec<u8>, mut n: u32) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The component with its rc-2026-03-15 WASI names renamed to 0.3.0, or `None` when it
/// has none (or is not a well-formed component: compiling it will say why).
pub fn to_final(wasm: &[u8]) -> Option<Vec<u8>> {
    rename(wasm).ok().flatten()
}

fn rename(wasm: &[u8]) -> wasmparser::Result<Option<Vec<u8>>> {
    if !Parser::is_component(wasm) || !contains(wasm, RC.as_bytes()) {
        return Ok(None);
    }
    let (mut out, mut pos, mut changed) = (wasm[..8].to_vec(), 8, false);
    while pos < wasm.len() {
        let mut header = BinaryReader::new(&wasm[pos..], pos);
        let id = header.read_u8()?;
        let size = header.read_var_u32()? as usize;
        let start = header.original_position();
        let end = start + size;
        if end > wasm.len() {
            return Ok(None);
        }
        if id != IMPORT_SECTION && id != EXPORT_SECTION {
            out.extend_from_slice(&wasm[pos..end]);
            pos = end;
            continue;
        }
        let body = BinaryReader::new(&wasm[start..end], start);
        let items: Vec<usize> = if id == IMPORT_SECTION {
            ComponentImportSectionReader::new(body)?
                .into_iter_with_offsets()
                .map(|item| item.map(|(offset, _)| offset))
                .collect::<Result<_, _>>()?
        } else {
            ComponentExportSectionReader::new(body)?
                .into_iter_with_offsets()
                .map(|item| item.map(|(offset, _)| offset))
                .collect::<Result<_, _>>()?
        };
        let mut section = Vec::with_capacity(size + 16);
        leb128(&mut section, items.len() as u32);
        for (i, &item) in items.iter().enumerate() {
            let item_end = items.get(i + 1).copied().unwrap_or(end);
            // 0x02 marks a name with options; such names are left as they are.
            let plain = matches!(wasm[item], 0x00 | 0x01);
            let mut reader = BinaryReader::new(&wasm[item..item_end], item);
            let name: ComponentExternName<'_> = reader.read()?;
            match final_name(name.name).filter(|_| plain) {
                Some(renamed) => {
                    section.push(0x00);
                    leb128(&mut section, renamed.len() as u32);
                    section.extend_from_slice(renamed.as_bytes());
                    section.extend_from_slice(&wasm[reader.original_position()..item_end]);
                    changed = true;
                }
                None => section.extend_from_slice(&wasm[item..item_end]),
            }
        }
        out.push(id);
        leb128(&mut out, section.len() as u32);
        out.extend_from_slice(&section);
        pos = end;
    }
    Ok(changed.then_some(out))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wasi_rc_names_are_renamed() {
        assert_eq!(
            final_name("wasi:http/handler@0.3.0-rc-2026-03-15").as_deref(),
            Some("wasi:http/handler@0.3.0")
        );
        assert_eq!(final_name("wasi:http/handler@0.3.0-rc-2026-01-06"), None);
        assert_eq!(final_name("wasi:keyvalue/store@0.3.0-rc-2026-03-15"), None);
        assert_eq!(final_name("wasi:http/handler@0.3.0"), None);
        assert!(to_final(b"\0asm\x0d\0\x01\0").is_none());
    }
}
