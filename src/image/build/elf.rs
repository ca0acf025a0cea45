//! Reads the few ELF64 fields the build needs: PT_INTERP and a module's `.modinfo`.

use anyhow::{anyhow, bail, Result};

/// Just enough little-endian ELF64 reading for module deps and a static check.
pub(super) struct Elf<'a> {
    data: &'a [u8],
}

impl<'a> Elf<'a> {
    pub(super) fn parse(data: &'a [u8]) -> Result<Elf<'a>> {
        // Magic, ELFCLASS64, ELFDATA2LSB.
        if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
            bail!("not a little-endian ELF64 file");
        }
        Ok(Elf { data })
    }

    fn bytes(&self, off: u64, len: u64) -> Result<&'a [u8]> {
        let start = usize::try_from(off)?;
        let end = start
            .checked_add(usize::try_from(len)?)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("ELF offset out of range"))?;
        Ok(&self.data[start..end])
    }

    fn u16(&self, off: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(off, 2)?.try_into()?))
    }

    fn u32(&self, off: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(off, 4)?.try_into()?))
    }

    fn u64(&self, off: u64) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(off, 8)?.try_into()?))
    }

    /// A PT_INTERP program header means the binary needs a dynamic loader.
    pub(super) fn has_interpreter(&self) -> Result<bool> {
        Ok(self.interpreter()?.is_some())
    }

    /// The dynamic loader's path from PT_INTERP, e.g. `/lib64/ld-linux-x86-64.so.2`.
    pub(super) fn interpreter(&self) -> Result<Option<String>> {
        let phoff = self.u64(0x20)?;
        let phentsize = u64::from(self.u16(0x36)?);
        let phnum = u64::from(self.u16(0x38)?);
        for i in 0..phnum {
            let header = phoff + i * phentsize;
            if self.u32(header)? == 3 {
                // Program header: p_offset @8, p_filesz @32; the path is NUL-terminated.
                let path = self.bytes(self.u64(header + 8)?, self.u64(header + 32)?)?;
                let path = path.split(|&b| b == 0).next().unwrap_or_default();
                return Ok(Some(String::from_utf8_lossy(path).into_owned()));
            }
        }
        Ok(None)
    }

    fn section(&self, wanted: &str) -> Result<Option<&'a [u8]>> {
        let shoff = self.u64(0x28)?;
        let shentsize = u64::from(self.u16(0x3a)?);
        let shnum = u64::from(self.u16(0x3c)?);
        let shstrndx = u64::from(self.u16(0x3e)?);
        let header = |i: u64| shoff + i * shentsize;
        // Section header: sh_name @0 (u32), sh_offset @24, sh_size @32.
        let strtab_off = self.u64(header(shstrndx) + 24)?;
        let strtab_size = self.u64(header(shstrndx) + 32)?;
        let strtab = self.bytes(strtab_off, strtab_size)?;
        for i in 0..shnum {
            let name_off = usize::try_from(self.u32(header(i))?)?;
            let name = strtab
                .get(name_off..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .unwrap_or_default();
            if name == wanted.as_bytes() {
                let off = self.u64(header(i) + 24)?;
                let size = self.u64(header(i) + 32)?;
                return Ok(Some(self.bytes(off, size)?));
            }
        }
        Ok(None)
    }

    /// `depends=a,b` from a kernel module's NUL-separated `.modinfo` strings.
    pub(super) fn modinfo_depends(&self) -> Result<Vec<String>> {
        let modinfo = self
            .section(".modinfo")?
            .ok_or_else(|| anyhow!("no .modinfo section"))?;
        let mut deps = Vec::new();
        for value in modinfo
            .split(|&b| b == 0)
            .filter_map(|kv| kv.strip_prefix(b"depends="))
        {
            let value = String::from_utf8_lossy(value);
            deps.extend(
                value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(deps)
    }
}
