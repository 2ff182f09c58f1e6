//! Kubernetes resource quantities ("100m", "1.5Gi", "2e3"), exactly: sums and comparisons
//! are exact, because the QoS class hangs on requests equalling limits and the kubelet
//! compares them as decimals.

/// A quantity in nano-units (10^-9 of a core, of a byte), the finest precision
/// Kubernetes keeps: `ParseQuantity` rounds anything finer up to the next nano-unit and
/// caps values at 2^63 - 1 units, and so does [`parse`].
pub type Nanos = i128;

const NANOS_PER_UNIT: Nanos = 1_000_000_000;
const MAX_UNITS: Nanos = i64::MAX as Nanos;

/// Parses a quantity (`"100m"`, `"1.5Gi"`, `"2e3"`, `"0.1"`) into nano-units. Negative
/// quantities are refused: no request or limit can be negative.
pub fn parse(text: &str) -> Result<Nanos, &'static str> {
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err("not a number");
    }
    if fraction.contains('.') {
        return Err("more than one decimal point");
    }
    let (exp10, exp2) = suffix_exponents(suffix)?;
    let digits = whole
        .bytes()
        .chain(fraction.bytes())
        .skip_while(|d| *d == b'0');
    let mut mantissa: Nanos = 0;
    for digit in digits {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(Nanos::from(digit - b'0')))
            .ok_or("too many digits")?;
    }
    if mantissa == 0 {
        return Ok(0);
    }
    if negative {
        return Err("negative");
    }
    // value = mantissa * 10^(exp10 - fraction digits) * 2^exp2, in units; scale to nanos.
    let fraction_len = i32::try_from(fraction.len()).map_err(|_| "too many digits")?;
    let exp10 = exp10 - fraction_len + 9;
    let scaled = mantissa
        .checked_mul(Nanos::from(2u8).checked_pow(exp2).ok_or("out of range")?)
        .ok_or("out of range");
    let nanos = match scaled {
        Ok(scaled) if exp10 >= 0 => 10i128
            .checked_pow(exp10.unsigned_abs())
            .and_then(|p| scaled.checked_mul(p))
            .unwrap_or(Nanos::MAX),
        // A divisor past i128 leaves less than a nano-unit of a non-zero value.
        Ok(scaled) => match 10i128.checked_pow(exp10.unsigned_abs()) {
            Some(divisor) => ceil_div(scaled, divisor),
            None => Nanos::from(scaled != 0),
        },
        Err(_) => Nanos::MAX,
    };
    Ok(nanos.min(MAX_UNITS * NANOS_PER_UNIT))
}

/// The decimal and binary exponents of a suffix: `m` is 10^-3, `Ki` is 2^10, `e3` 10^3.
fn suffix_exponents(suffix: &str) -> Result<(i32, u32), &'static str> {
    Ok(match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        exponent if exponent.starts_with(['e', 'E']) => {
            let value: i32 = exponent[1..].parse().map_err(|_| "unknown suffix")?;
            if value.abs() > 100 {
                return Err("out of range");
            }
            (value, 0)
        }
        _ => return Err("unknown suffix"),
    })
}

fn ceil_div(value: Nanos, divisor: Nanos) -> Nanos {
    value / divisor + Nanos::from(value % divisor != 0)
}

/// The quantity in thousandths, rounded up, as `Quantity.MilliValue()`.
pub fn milli_value(nanos: Nanos) -> i64 {
    to_i64(ceil_div(nanos, 1_000_000))
}

/// The quantity in units, rounded up, as `Quantity.Value()`.
pub fn value(nanos: Nanos) -> i64 {
    to_i64(ceil_div(nanos, NANOS_PER_UNIT))
}

/// CPU in millicores, rounded up; `None` when `text` is not a quantity.
pub fn milli_cpu(text: &str) -> Option<i64> {
    parse(text.trim()).ok().map(milli_value)
}

/// A plain amount (bytes, a count) in units, rounded up; `None` when not a quantity.
pub fn units(text: &str) -> Option<i64> {
    parse(text.trim()).ok().map(value)
}

/// `value / divisor`, rounded up, as the downward API divides resources.
pub fn divide_ceil(value: Nanos, divisor: Nanos) -> Nanos {
    ceil_div(value, divisor.max(1))
}

fn to_i64(value: Nanos) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(text: &str) -> i64 {
        milli_value(parse(text).unwrap())
    }

    fn units(text: &str) -> i64 {
        value(parse(text).unwrap())
    }

    #[test]
    fn decimal_and_binary_suffixes() {
        assert_eq!(milli("100m"), 100);
        assert_eq!(milli("0.1"), 100);
        assert_eq!(milli(".5"), 500);
        assert_eq!(milli("2"), 2000);
        assert_eq!(milli("1500u"), 2);
        assert_eq!(milli("1n"), 1);
        assert_eq!(units("200Mi"), 200 * 1024 * 1024);
        assert_eq!(units("1.5Ki"), 1536);
        assert_eq!(units("1G"), 1_000_000_000);
        assert_eq!(units("129e6"), 129_000_000);
        assert_eq!(units("1E"), 1_000_000_000_000_000_000);
        assert_eq!(units("12e-1"), 2);
        assert_eq!(units("+5"), 5);
        assert_eq!(units("0"), 0);
        assert_eq!(units("-0"), 0);
        assert_eq!(units("0e99"), 0);
    }

    #[test]
    fn fractions_of_a_unit_round_up_as_value_does() {
        // Upstream's "burstable-partial-limits-with-init-containers" asks for "100m" bytes.
        assert_eq!(units("100m"), 1);
        assert_eq!(units("1001m"), 2);
        // Finer than a nano-unit rounds up to one.
        assert_eq!(parse("0.0000000001").unwrap(), 1);
        assert_eq!(parse("1e-40").unwrap(), 1);
    }

    #[test]
    fn exact_where_floats_are_not() {
        assert_eq!(
            parse("0.1").unwrap() + parse("0.2").unwrap(),
            parse("300m").unwrap()
        );
        assert_eq!(units("123456789012345678"), 123_456_789_012_345_678);
        assert_ne!(parse("100.5m").unwrap(), parse("101m").unwrap());
    }

    #[test]
    fn huge_values_are_capped() {
        assert_eq!(units("99999Ei"), i64::MAX);
        assert_eq!(units("1e99"), i64::MAX);
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for text in [
            "", "m", ".", "1.2.3", "12Qi", "1e", "1ex", "-1", "1 m", "1e101",
        ] {
            assert!(parse(text).is_err(), "{text:?} parsed");
        }
    }
}
