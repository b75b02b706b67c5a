//! `lathe pack new | build | inspect | install | list | export`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use lathe_jobs::pack::{LocalPacks, Pack, shipped::Template};
use serde_json::Value;

use crate::cli::DataDir;
use crate::render::Terminal;

#[derive(Subcommand)]
pub enum PackCommand {
    /// Write a pack's source folder: a blank one to edit, or one that ships with Lathe
    /// (`--template invoice-extraction`, `support-triage`).
    New {
        /// The folder to create.
        dir: PathBuf,
        /// The pack's name (default: the folder's name, or the template's).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "blank")]
        template: String,
    },
    /// Build a source folder into NAME-VERSION.lathepack (its sha256 is the pack's identity).
    Build {
        dir: PathBuf,
        /// Default: NAME-VERSION.lathepack in the current folder.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a pack and show what it holds and what its plugins ask for.
    Inspect {
        pack: PathBuf,
        /// Print the description as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a pack, check its plugins as uploads are checked, and install its plugins,
    /// suites and data into the data folder.
    Install {
        pack: PathBuf,
        #[command(flatten)]
        dir: DataDir,
    },
    /// The packs installed in the data folder.
    List {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Write an installed pack's file, byte for byte as it was installed.
    Export {
        /// The pack's name or sha256.
        pack: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dir: DataDir,
    },
}

pub fn run(cmd: PackCommand) -> Result<()> {
    match cmd {
        PackCommand::New { dir, name, template } => {
            let template = Template::parse(&template)?;
            let name = name.or_else(|| (template == Template::Blank).then(|| dir.file_name().map(|n| n.to_string_lossy().into_owned())).flatten());
            template.write(&dir, name.as_deref())?;
            println!("wrote {}: edit pack.toml, suites/ and data/, then `lathe pack build {}`", dir.display(), dir.display());
            Ok(())
        }
        PackCommand::Build { dir, out } => {
            let bytes = Pack::build(&dir, &crate::plugin::runtime()?)?;
            let pack = Pack::read(&bytes)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.{}", pack.manifest.name, pack.manifest.version, lathe_jobs::pack::EXTENSION)));
            lathe_util::write_atomic(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("{} {} ({} bytes)\nsha256 {}", pack.id(), out.display(), bytes.len(), pack.sha256);
            Ok(())
        }
        PackCommand::Inspect { pack, json } => {
            let pack = Pack::open(&pack)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pack.describe())?);
            } else {
                print!("{}", render(&pack.describe()));
            }
            Ok(())
        }
        PackCommand::Install { pack, dir } => {
            let bytes = std::fs::read(&pack).with_context(|| format!("reading {}", pack.display()))?;
            let env = dir.env();
            let i = LocalPacks::new(&env).install(&bytes, &Terminal::new())?;
            let heldout = i.refs.get("heldout").map(String::as_str).unwrap_or("?");
            let train = i.refs.get("fewshot").map(String::as_str).unwrap_or("?");
            for suite in &i.suites {
                println!("measure the base model: lathe eval baseline --suite {suite} --data {heldout} --train {train}");
            }
            Ok(())
        }
        PackCommand::List { dir } => {
            let env = dir.env();
            let installed = LocalPacks::new(&env).list()?;
            if installed.is_empty() {
                println!("no packs installed in {} (lathe pack install FILE)", env.root().display());
            }
            for i in installed.values() {
                println!("{:<24} {:<8} {}  suites: {}", i.name, i.version, &i.sha256[..12], i.suites.join(", "));
            }
            Ok(())
        }
        PackCommand::Export { pack, out, dir } => {
            let env = dir.env();
            let file = LocalPacks::new(&env).file(&pack)?;
            // Verified on the way out as on the way in.
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let p = Pack::read(&bytes)?;
            if out.exists() {
                bail!("{} exists already", out.display());
            }
            lathe_util::write_atomic(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("{} → {} (sha256 {})", p.id(), out.display(), p.sha256);
            Ok(())
        }
    }
}

/// `lathe pack inspect` for people: identity, what it asks for, then each part.
fn render(d: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut out = format!(
        "{}@{}  ({} bytes)\nsha256 {}\n{}\nlicense {}, plugins for lathe:plugin@{}\n\n",
        s(&d["name"]),
        s(&d["version"]),
        d["bytes"],
        s(&d["sha256"]),
        s(&d["description"]),
        s(&d["license"]),
        s(&d["wit"])
    );
    let asks = &d["asks"];
    out += &format!(
        "asks for: worlds {}; up to {} MiB per instance, {} ms per call; network: {}\n\nplugins\n",
        asks["worlds"].as_array().map(|w| w.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        asks["memory_mb"],
        asks["timeout_ms"],
        if asks["network"].as_bool() == Some(true) { "asked (no host grants it)" } else { "none" },
    );
    for p in d["plugins"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:<18} {:<9} {:<8} {}  {:>8} bytes  {} MiB, {} ms  ({})\n",
            s(&p["name"]),
            s(&p["world"]),
            s(&p["version"]),
            &s(&p["sha256"])[..12.min(s(&p["sha256"]).len())],
            p["bytes"],
            p["asks"]["memory_mb"],
            p["asks"]["timeout_ms"],
            s(&p["origin"])
        );
    }
    out += "suites\n";
    for su in d["suites"].as_array().into_iter().flatten() {
        let gate = match &su["gate"] {
            Value::Object(g) => format!("gate {} ≥ {}", g["metric"].as_str().unwrap_or(""), g["min"]),
            _ => "no gate".into(),
        };
        let judge = match &su["judge"] {
            Value::Object(j) => {
                let m = &j["model"];
                let on = match m["kind"].as_str() {
                    Some("openai") => {
                        let key = m["api_key_env"].as_str().map(|k| format!(", key in ${k}")).unwrap_or_default();
                        format!("{} at {}{key}", s(&m["model"]), s(&m["base_url"]))
                    }
                    _ => format!("local model {}", s(&m["path"])),
                };
                let structured = if j["structured_output"].as_bool() == Some(true) { ", structured output" } else { "" };
                format!("\n  {:<18} judge {} on {on}{structured}", "", s(&j["plugin"]))
            }
            _ => String::new(),
        };
        out += &format!("  {:<18} {gate}{judge}\n", s(&su["name"]));
    }
    out += "data\n";
    for da in d["data"].as_array().into_iter().flatten() {
        out += &format!("  {:<8} {:>5} items  {}\n", s(&da["role"]), da["rows"], s(&da["provenance"]));
    }
    if let Value::Object(v) = &d["verdicts"] {
        out += &format!("  verdicts {:>5} cached  {}\n", v["rows"], v["provenance"].as_str().unwrap_or(""));
    }
    out
}
