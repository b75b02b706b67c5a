//! A fine component of the wrong world: a calculator, not a Lathe plugin.
wit_bindgen::generate!({ path: "wit", world: "calculator" });

struct Calc;

impl Guest for Calc {
    fn add(a: u32, b: u32) -> u32 {
        a.wrapping_add(b)
    }
}

export!(Calc);
