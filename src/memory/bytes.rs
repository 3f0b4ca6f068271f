//! Byte sizes as people write and read them: `--memory-budget 8GiB` in, `3.21 GiB` out.

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A `--memory-budget` value that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseBytesError {
    #[error(
        "memory size is empty; expected e.g. `8GiB`, `8GB`, `512MiB`, `1.5GiB` or a byte count"
    )]
    Empty,
    #[error(
        "invalid memory size `{input}`: `{number}` is not a non-negative number; \
         expected e.g. `8GiB`, `1.5GiB`, `512MiB` or a byte count"
    )]
    InvalidNumber { input: String, number: String },
    #[error(
        "invalid memory size `{input}`: unknown unit `{unit}`; use B, KiB, MiB, GiB, TiB (binary), \
         KB, MB, GB, TB (decimal) or K, M, G, T (binary)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("invalid memory size `{input}`: a byte count cannot have a fraction")]
    FractionalBytes { input: String },
    #[error("invalid memory size `{input}`: larger than 2^64 bytes")]
    TooLarge { input: String },
}

/// Parses a memory size: `8GiB`, `512MiB`, `1.5GiB` (binary), `8GB`, `500MB` (decimal, powers of 1000),
/// `8G`, `512M` (single letters are read as binary, like `free -h` and most GPU tools print them), or a
/// plain byte count. Units are case-insensitive and may follow a space. Fractions round down to a byte.
pub fn parse_bytes(s: &str) -> Result<u64, ParseBytesError> {
    let text = s.trim();
    if text.is_empty() {
        return Err(ParseBytesError::Empty);
    }
    let split = text
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    if number.is_empty() {
        return Err(ParseBytesError::InvalidNumber {
            input: s.to_owned(),
            number: text.to_owned(),
        });
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(ParseBytesError::UnknownUnit {
                input: s.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    let invalid = || ParseBytesError::InvalidNumber {
        input: s.to_owned(),
        number: number.to_owned(),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(invalid());
    }
    // Digits past the 24th are below a byte for every unit here (the largest is 2^40 < 10^13).
    let frac_part = &frac_part[..frac_part.len().min(24)];
    if multiplier == 1 && !frac_part.is_empty() {
        return Err(ParseBytesError::FractionalBytes {
            input: s.to_owned(),
        });
    }
    // Exact decimal arithmetic in u128: "1.1GB" must be 1_100_000_000, which f64 would not promise.
    let digits = format!("{int_part}{frac_part}");
    // 30 significant digits are far beyond u64 range, so longer inputs are too large (or padding).
    let digits = digits.trim_start_matches('0');
    let too_large = || ParseBytesError::TooLarge {
        input: s.to_owned(),
    };
    if digits.len() > 30 {
        return Err(too_large());
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| invalid())?
    };
    let scale = 10u128
        .checked_pow(u32::try_from(frac_part.len()).map_err(|_| too_large())?)
        .ok_or_else(too_large)?;
    let bytes = mantissa
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?
        / scale;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// A byte count for people: GiB with two decimals from 1 GiB up, else MiB, KiB or B.
pub fn format_bytes(bytes: u64) -> String {
    // f64 is fine for display: two decimals, never fed back into arithmetic.
    let b = bytes as f64;
    if bytes >= GIB {
        format!("{:.2} GiB", b / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.0} MiB", b / MIB as f64)
    } else if bytes >= KIB {
        format!("{:.0} KiB", b / KIB as f64)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    #[test]
    fn byte_sizes_parse() {
        let cases: [(&str, u64); 14] = [
            ("8GiB", 8 * GIB),
            ("8GB", 8 * GB),
            ("8G", 8 * GIB),
            ("8g", 8 * GIB),
            ("512MiB", 512 * MIB),
            ("1.5GiB", 3 * GIB / 2),
            ("1.1GB", 1_100_000_000),
            ("0.5 gib", GIB / 2),
            (" 12 GiB ", 12 * GIB),
            ("1073741824", GIB),
            ("1024B", 1024),
            ("4k", 4096),
            (".5GiB", GIB / 2),
            ("2TB", 2_000_000_000_000),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_bytes("0.000000000000000000000000000000001GiB"), Ok(0));
    }

    #[test]
    fn byte_size_errors_name_the_input() {
        let err = |s: &str| parse_bytes(s).expect_err(s).to_string();
        assert!(err("").contains("empty"));
        assert!(
            err("8 gigs").contains("`8 gigs`") && err("8 gigs").contains("unknown unit `gigs`")
        );
        assert!(err("-1GiB").contains("`-1GiB`"));
        assert!(err("GiB").contains("not a non-negative number"));
        assert!(err("1.2.3GiB").contains("`1.2.3`"));
        assert!(err("1.5").contains("cannot have a fraction"));
        assert!(err("18446744073709551616").contains("larger than"));
        assert!(err("99999999999999999999999999999999999TiB").contains("larger than"));
    }

    #[test]
    fn bytes_format_for_people() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1536), "2 KiB");
        assert_eq!(format_bytes(512 * MIB), "512 MiB");
        assert_eq!(format_bytes(12 * GIB + GIB / 4), "12.25 GiB");
    }
}
