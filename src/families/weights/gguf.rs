//! GGUF (v2/v3) headers read straight from a memory map — every length and offset bounds-checked,
//! so a truncated or hostile file is an error naming the file and the tensor, never a panic — and
//! a v3 writer for `zturbo quantize`. Tensor data is not touched here; `Weights` maps it lazily.

use std::collections::BTreeMap;
use std::io::Write;

use candle_core::quantized::GgmlDType;

/// The magic `GGUF` as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Caps as llama.cpp has them: no header field may claim more than the file holds anyway.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

/// A GGML tensor type id, known to candle or not (unknown ones are reported by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeId(pub u32);

impl TypeId {
    /// ggml.h's names for every type id that has been assigned.
    pub fn name(self) -> String {
        let n = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            other => return format!("type {other}"),
        };
        n.to_string()
    }

    /// The candle type, for the types candle can decode.
    pub fn candle(self) -> Option<GgmlDType> {
        Some(match self.0 {
            0 => GgmlDType::F32,
            1 => GgmlDType::F16,
            2 => GgmlDType::Q4_0,
            3 => GgmlDType::Q4_1,
            6 => GgmlDType::Q5_0,
            7 => GgmlDType::Q5_1,
            8 => GgmlDType::Q8_0,
            9 => GgmlDType::Q8_1,
            10 => GgmlDType::Q2K,
            11 => GgmlDType::Q3K,
            12 => GgmlDType::Q4K,
            13 => GgmlDType::Q5K,
            14 => GgmlDType::Q6K,
            15 => GgmlDType::Q8K,
            30 => GgmlDType::BF16,
            _ => return None,
        })
    }

    pub fn of(t: GgmlDType) -> Self {
        Self(match t {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::Q4_0 => 2,
            GgmlDType::Q4_1 => 3,
            GgmlDType::Q5_0 => 6,
            GgmlDType::Q5_1 => 7,
            GgmlDType::Q8_0 => 8,
            GgmlDType::Q8_1 => 9,
            GgmlDType::Q2K => 10,
            GgmlDType::Q3K => 11,
            GgmlDType::Q4K => 12,
            GgmlDType::Q5K => 13,
            GgmlDType::Q6K => 14,
            GgmlDType::Q8K => 15,
            GgmlDType::BF16 => 30,
        })
    }
}

/// The types zturbo reads, for messages.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// One tensor's header entry. `dims` are in the row-major order candle and PyTorch use
/// (`[out, in]` for a linear weight): GGUF lists them innermost first, they are reversed here.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: TypeId,
    /// Absolute byte range of the data in the file.
    pub range: std::ops::Range<usize>,
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorEntry>,
}

/// Why a GGUF header cannot be used; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (no `GGUF` magic)")]
    NotGguf,
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("the header ends early ({0}): the file is truncated or not GGUF")]
    Truncated(&'static str),
    #[error("metadata `{key}` has unknown value type {ty}")]
    ValueType { key: String, ty: u32 },
    #[error("tensor `{name}` has {dims} dimensions (at most {MAX_DIMS})")]
    Dims { name: String, dims: u32 },
    #[error(
        "tensor `{name}` uses GGUF type {ty}, which zturbo cannot read (supported: {SUPPORTED})"
    )]
    Unsupported { name: String, ty: String },
    #[error("tensor `{name}` has {elems} values, which do not fill whole {ty} blocks of {block}")]
    Blocks {
        name: String,
        elems: usize,
        ty: String,
        block: usize,
    },
    #[error(
        "tensor `{name}` needs bytes {start}..{end} but the file has {len}: the file is truncated"
    )]
    PastEnd {
        name: String,
        start: usize,
        end: usize,
        len: usize,
    },
    #[error("tensor `{name}` is listed twice")]
    Duplicate { name: String },
    #[error("`general.alignment` {0} is not a power of two")]
    Alignment(u64),
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(GgufError::Truncated(what))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self, what: &'static str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        // Nothing can be longer than what is left of the file.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.pos)
            .ok_or(GgufError::Truncated(what))
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.len(what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Value, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => Value::U8(self.take(1, W)?[0]),
            1 => Value::I8(self.take(1, W)?[0] as i8),
            2 => {
                let b = self.take(2, W)?;
                Value::U16(u16::from_le_bytes([b[0], b[1]]))
            }
            3 => {
                let b = self.take(2, W)?;
                Value::I16(i16::from_le_bytes([b[0], b[1]]))
            }
            4 => Value::U32(self.u32(W)?),
            5 => Value::I32(self.u32(W)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(W)?)),
            7 => Value::Bool(self.take(1, W)?[0] != 0),
            8 => Value::String(self.string(W)?),
            9 => {
                if depth > 8 {
                    return Err(GgufError::Truncated("nested arrays"));
                }
                let inner = self.u32(W)?;
                let n = self.len(W)?;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(key, inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(W)?),
            11 => Value::I64(self.u64(W)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(W)?)),
            other => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    ty: other,
                })
            }
        })
    }
}

/// True when `bytes` starts with the GGUF magic.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == MAGIC
}

/// Parses the header of a whole mapped file and checks every tensor: a type candle decodes, whole
/// blocks, data inside the file.
pub fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.u32("magic").map_err(|_| GgufError::NotGguf)? != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Each entry takes at least 8 bytes of header: counts beyond the file are lies.
    if n_tensors.saturating_add(n_kv).saturating_mul(8) > bytes.len() as u64 {
        return Err(GgufError::Truncated("counts larger than the file"));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let v = c.value(&key, ty, 0)?;
        metadata.insert(key, v);
    }
    struct Raw {
        name: String,
        dims: Vec<usize>,
        ty: u32,
        offset: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor dims")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Dims { name, dims: n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64("tensor shape")?;
            dims.push(usize::try_from(d).map_err(|_| GgufError::Truncated("tensor shape"))?);
        }
        dims.reverse();
        let ty = c.u32("tensor type")?;
        let offset = c.u64("tensor offset")?;
        raws.push(Raw {
            name,
            dims,
            ty,
            offset,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::Alignment(alignment));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raws.len());
    let mut seen = std::collections::HashSet::new();
    for r in raws {
        if !seen.insert(r.name.clone()) {
            return Err(GgufError::Duplicate { name: r.name });
        }
        let ty = TypeId(r.ty);
        let Some(dt) = ty.candle() else {
            return Err(GgufError::Unsupported {
                name: r.name,
                ty: ty.name(),
            });
        };
        let elems = r
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or(GgufError::Truncated("tensor shape overflows"))?;
        let block = dt.block_size();
        if elems % block != 0 || r.dims.last().is_some_and(|&d| d % block != 0) {
            return Err(GgufError::Blocks {
                name: r.name,
                elems,
                ty: ty.name(),
                block,
            });
        }
        let size = (elems / block)
            .checked_mul(dt.type_size())
            .ok_or(GgufError::Truncated("tensor size overflows"))?;
        let start = data_start.checked_add(r.offset).map(|s| s as usize);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() => tensors.push(TensorEntry {
                name: r.name,
                dims: r.dims,
                ty,
                range: s..e,
            }),
            _ => {
                return Err(GgufError::PastEnd {
                    name: r.name,
                    start: start.unwrap_or(usize::MAX),
                    end: end.unwrap_or(usize::MAX),
                    len: bytes.len(),
                })
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
    })
}

/// One tensor to write: its name, row-major dims, type and raw block bytes.
pub struct OutTensor<'a> {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlDType,
    pub data: std::borrow::Cow<'a, [u8]>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let inner = items.first().map_or(4, Value::type_id);
            out.extend_from_slice(&inner.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// The header of a v3 file (magic … padding up to the first tensor) and each tensor's offset.
pub fn header_bytes(
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, GgmlDType, usize)],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, size) in tensors {
        put_string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&TypeId::of(*ty).0.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (*size as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let pad =
        out.len().div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize - out.len();
    out.resize(out.len() + pad, 0);
    out
}

/// Streams a v3 file: the header first (every tensor's size must be known up front), then each
/// tensor's data as `next` produces it, padded to the alignment.
pub fn write<W: Write>(
    w: &mut W,
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, GgmlDType, usize)],
    mut next: impl FnMut(usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<()> {
    w.write_all(&header_bytes(metadata, tensors))?;
    for (i, (name, _, _, size)) in tensors.iter().enumerate() {
        let data = next(i)?;
        if data.len() != *size {
            return Err(std::io::Error::other(format!(
                "tensor `{name}`: {} bytes produced, {size} announced",
                data.len()
            )));
        }
        w.write_all(&data)?;
        let pad = size.div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize - size;
        w.write_all(&vec![0u8; pad])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("test".into()),
            ),
            ("test.count".to_string(), Value::U32(3)),
            (
                "comfy.gguf.orig_shape.w".to_string(),
                Value::Array(vec![Value::I32(2), Value::I32(32)]),
            ),
        ];
        let tensors = vec![
            ("w".to_string(), vec![2, 32], GgmlDType::Q8_0, 2 * 34),
            ("b".to_string(), vec![3], GgmlDType::F32, 12),
        ];
        let mut out = Vec::new();
        write(&mut out, &meta, &tensors, |i| {
            Ok(vec![i as u8 + 1; tensors[i].3])
        })
        .unwrap();
        out
    }

    #[test]
    fn writes_and_reads_back() {
        let bytes = sample();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["test.count"].as_u64(), Some(3));
        assert_eq!(h.tensors[0].dims, vec![2, 32]);
        assert_eq!(h.tensors[0].range.len(), 68);
        assert_eq!(h.tensors[0].range.start % 32, 0);
        assert!(bytes[h.tensors[1].range.clone()].iter().all(|&b| b == 2));
    }

    #[test]
    fn every_cut_is_an_error_not_a_panic() {
        let bytes = sample();
        // Only the padding after the last tensor's data may go.
        let end = parse(&bytes)
            .unwrap()
            .tensors
            .iter()
            .map(|t| t.range.end)
            .max()
            .unwrap();
        for cut in 0..end {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(&bytes[..end]).is_ok());
    }

    #[test]
    fn names_unsupported_types() {
        let mut bytes = sample();
        // Tensor `w`'s entry: name length (u64 1) and `w`, dims count, two dims, then its type.
        let name_at = bytes
            .windows(9)
            .position(|w| w == b"\x01\x00\x00\x00\x00\x00\x00\x00w")
            .unwrap();
        let ty_at = name_at + 9 + 4 + 16;
        assert_eq!(
            u32::from_le_bytes(bytes[ty_at..ty_at + 4].try_into().unwrap()),
            8
        );
        bytes[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes());
        let e = parse(&bytes).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("IQ4_NL"), "{e}");
    }
}
