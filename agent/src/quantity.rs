//! Kubernetes resource quantities ("100m", "16Mi", "1.5", "2e3") as integers the agent can
//! add, compare and write into cgroup files.

/// Parses `text` and returns its value times `scale`, rounded up (so `"1m"` of a CPU at
/// scale 1000 is 1 and `"0.5"` is 500), or `None` when it is not a quantity.
pub fn parse_scaled(text: &str, scale: i64) -> Option<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            10f64.powi(exponent[1..].parse::<i32>().ok()?)
        }
        _ => return None,
    };
    let value = number * multiplier * scale as f64;
    // Binary fractions (0.1 * 1000) land a hair above the integer; do not round those up.
    let rounded = value.round();
    let value = if (value - rounded).abs() < 1e-6 {
        rounded
    } else {
        value.ceil()
    };
    (value.is_finite() && value.abs() <= i64::MAX as f64).then_some(value as i64)
}

/// CPU in millicores.
pub fn milli_cpu(text: &str) -> Option<i64> {
    parse_scaled(text, 1000)
}

/// Memory (or any plain count) in units.
pub fn units(text: &str) -> Option<i64> {
    parse_scaled(text, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_become_integers() {
        assert_eq!(milli_cpu("100m"), Some(100));
        assert_eq!(milli_cpu("0.1"), Some(100));
        assert_eq!(milli_cpu("1500u"), Some(2));
        assert_eq!(units("16Mi"), Some(16 << 20));
        assert_eq!(units("1G"), Some(1_000_000_000));
        assert_eq!(units("129e6"), Some(129_000_000));
        assert_eq!(units("1.5Ki"), Some(1536));
        assert_eq!(units(""), None);
        assert_eq!(units("12Qi"), None);
    }
}
