//! `precise_total_amount_cents`: the exact amount Lago's `dynamic` charge model bills for an
//! event, = `response_cost` × 100 × `TALLY_COST_MARKUP`, as a decimal string.
//!
//! Computed in decimal, not in binary floating point: the cost is taken as the spend log writes
//! it (the shortest decimal that reads back as the same double, e.g. `0.0001675`), the markup as
//! the operator wrote it (e.g. `1.2`), and the product is exact — every digit of it is sent,
//! trailing zeros trimmed (`0.0201`, never `0.020100000000000003`). The same record and markup
//! always give the same string, so the event stays byte-identical across resends.

use std::fmt;
use std::str::FromStr;

/// Most significant digits a markup may have: keeps the exact product within `u128`
/// (a cost has at most 17, and both together stay under 10^38).
const MAX_MARKUP_DIGITS: usize = 19;

/// A non-negative decimal `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: u128,
    scale: u32,
}

impl Decimal {
    /// Plain decimal notation (`12`, `0.5`, `1.25`): digits with at most one point.
    fn parse_plain(s: &str) -> Option<Self> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = format!("{int}{frac}");
        let significant = digits.trim_start_matches('0');
        let mantissa = if significant.is_empty() {
            0
        } else {
            significant.parse::<u128>().ok()?
        };
        Some(Self::normalized(Self {
            mantissa,
            scale: u32::try_from(frac.len()).ok()?,
        }))
    }

    /// Without trailing zeros in the mantissa.
    fn normalized(mut self) -> Self {
        while self.scale > 0 && self.mantissa.is_multiple_of(10) {
            self.mantissa /= 10;
            self.scale -= 1;
        }
        if self.mantissa == 0 {
            self.scale = 0;
        }
        self
    }

    fn significant_digits(&self) -> usize {
        if self.mantissa == 0 {
            1
        } else {
            self.mantissa.ilog10() as usize + 1
        }
    }

    fn checked_mul(self, other: Self) -> Option<Self> {
        Some(
            Self {
                mantissa: self.mantissa.checked_mul(other.mantissa)?,
                scale: self.scale.checked_add(other.scale)?,
            }
            .normalized(),
        )
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.mantissa.to_string();
        let scale = self.scale as usize;
        if scale == 0 {
            return f.write_str(&digits);
        }
        if digits.len() > scale {
            let (int, frac) = digits.split_at(digits.len() - scale);
            write!(f, "{int}.{frac}")
        } else {
            write!(f, "0.{}{digits}", "0".repeat(scale - digits.len()))
        }
    }
}

/// `TALLY_COST_MARKUP`: what every cost is multiplied by in `precise_total_amount_cents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Markup(Decimal);

impl Default for Markup {
    /// 1: Lago bills the provider's price.
    fn default() -> Self {
        Self(Decimal {
            mantissa: 1,
            scale: 0,
        })
    }
}

impl fmt::Display for Markup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkupError {
    #[error(
        "a markup below 0 would credit customers; write 1 for the provider's price, 1.2 for 20% on top"
    )]
    Negative,
    #[error(
        "not a plain decimal number (inf, NaN, exponents and signs are refused); write e.g. 1, 1.2 or 0.9"
    )]
    Format,
    #[error("more than {MAX_MARKUP_DIGITS} significant digits; write it shorter, e.g. 1.25")]
    TooPrecise,
}

impl FromStr for Markup {
    type Err = MarkupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('-') {
            // "-0" is 0, not a negative markup; anything else below 0 is refused.
            return match Decimal::parse_plain(rest) {
                Some(d) if d.mantissa == 0 => Ok(Self(d)),
                Some(_) => Err(MarkupError::Negative),
                None => Err(MarkupError::Format),
            };
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let plain = !s.is_empty()
            && s != "."
            && s.bytes().filter(|b| *b == b'.').count() <= 1
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        // Plain but unparsable: too many digits for the exact product.
        let d = Decimal::parse_plain(s).ok_or(if plain {
            MarkupError::TooPrecise
        } else {
            MarkupError::Format
        })?;
        if d.significant_digits() > MAX_MARKUP_DIGITS {
            return Err(MarkupError::TooPrecise);
        }
        Ok(Self(d))
    }
}

/// `cost_usd` × 100 × `markup` as an exact decimal string, or `None` for a cost that is not a
/// finite non-negative number (the spend record's validation already refuses those).
pub fn precise_total_amount_cents(cost_usd: f64, markup: Markup) -> Option<String> {
    if !(cost_usd.is_finite() && cost_usd >= 0.0) {
        return None;
    }
    // Rust's `Display` of a double is the shortest decimal that reads back as it, in plain
    // notation: what serde_json writes into the spend log, without its exponent form.
    let cost = Decimal::parse_plain(&format!("{cost_usd}"))?;
    let cents = Decimal {
        mantissa: cost.mantissa,
        scale: cost.scale,
    }
    .checked_mul(Decimal {
        mantissa: 100,
        scale: 0,
    })?
    .checked_mul(markup.0)?;
    Some(cents.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cents(cost: f64, markup: &str) -> String {
        precise_total_amount_cents(cost, markup.parse().unwrap()).unwrap()
    }

    #[test]
    fn cost_times_100_times_markup_exactly() {
        assert_eq!(cents(0.0001675, "1"), "0.01675");
        assert_eq!(cents(0.0001675, "1.2"), "0.0201");
        assert_eq!(cents(0.1 + 0.2, "1"), "30.000000000000004");
        assert_eq!(cents(0.015525, "1.15"), "1.785375");
        assert_eq!(cents(0.0, "1.5"), "0");
        assert_eq!(cents(1e-9, "1"), "0.0000001");
        assert_eq!(cents(12.5, "2"), "2500");
        assert_eq!(cents(999_999.99, "0"), "0");
        assert_eq!(cents(2.468e-5, "1"), "0.002468");
    }

    #[test]
    fn the_same_inputs_give_the_same_string() {
        let m: Markup = "1.07".parse().unwrap();
        assert_eq!(
            precise_total_amount_cents(0.006767200000000001, m),
            precise_total_amount_cents(0.006767200000000001, m)
        );
        assert_eq!(
            precise_total_amount_cents(0.006767200000000001, m).unwrap(),
            "0.72409040000000010700".trim_end_matches('0').to_owned()
        );
    }

    #[test]
    fn markups_are_plain_non_negative_decimals() {
        assert_eq!("1".parse::<Markup>().unwrap(), Markup::default());
        assert_eq!("1.000".parse::<Markup>().unwrap(), Markup::default());
        assert_eq!(" 1.25 ".parse::<Markup>().unwrap().to_string(), "1.25");
        assert_eq!(".5".parse::<Markup>().unwrap().to_string(), "0.5");
        assert_eq!("-0".parse::<Markup>().unwrap().to_string(), "0");
        assert_eq!("-0.5".parse::<Markup>(), Err(MarkupError::Negative));
        for bad in ["", ".", "inf", "NaN", "1e3", "1,5", "abc", "--1", "1.2.3"] {
            assert_eq!(bad.parse::<Markup>(), Err(MarkupError::Format), "{bad:?}");
        }
        assert_eq!(
            "1.00000000000000000001".parse::<Markup>(),
            Err(MarkupError::TooPrecise)
        );
        assert_eq!(
            format!("1.{}", "0".repeat(60) + "1").parse::<Markup>(),
            Err(MarkupError::TooPrecise)
        );
    }

    #[test]
    fn unusable_costs_give_no_amount() {
        assert_eq!(
            precise_total_amount_cents(f64::NAN, Markup::default()),
            None
        );
        assert_eq!(precise_total_amount_cents(-1.0, Markup::default()), None);
    }
}
