//! Agent names: the stable name a tagged cgroup runs under (`brokerctl attach --as NAME`).
//!
//! A container runtime puts a workload's cgroup wherever it likes (`libpod_parent/libpod-<id>`,
//! `kubepods.slice/.../cri-containerd-<id>.scope`), so policies cannot be written against that
//! path. A tag may carry a name instead: connections and DNS queries from the tagged cgroup `T`
//! are attributed to `NAME`, and from a cgroup `T/x` below it to `NAME/x`. Policy files, handles,
//! shares, audit records, the console and `status` all see the name, exactly as they would see
//! a cgroup at that path, so delegation narrowing below a named tag keeps working. The real
//! cgroup path stays in the audit record beside the name. Without a name, a tag's name is its
//! path (the behaviour before names existed).
//!
//! Names live in one space with the paths of tags, and like tags they never nest: a tag's name
//! may not equal, contain or lie below another tag's name or cgroup path, nor its cgroup path
//! another tag's name (a tag without a name is named by its path). Otherwise one workload's
//! policy file would silently narrow an unrelated one, a handle minted for one would be good for
//! the other, and `logs --cgroup` would mix them, with nothing in the kernel relating the two.
//!
//! Pure: no I/O. brokerd's capture layer keeps the names with the pinned links and asks this
//! module what a cgroup is called and whether a new name may be taken.

use std::fmt;

use crate::cgroup::CgroupPath;

/// One tag and the name it runs under (its own path when it has no name of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedTag<'a> {
    /// The tagged cgroup, relative to the cgroup2 mount.
    pub cgroup: &'a CgroupPath,
    /// The agent name its connections are attributed to.
    pub name: &'a CgroupPath,
}

/// The agent name of `cgroup`, a cgroup at or below the tagged cgroup `tag` whose name is
/// `name`: `name` followed by whatever of `cgroup` lies below `tag`. None when `cgroup` is not
/// `tag` or below it.
pub fn rebase(cgroup: &CgroupPath, tag: &CgroupPath, name: &CgroupPath) -> Option<CgroupPath> {
    if !tag.is_ancestor_or_self_of(cgroup) {
        return None;
    }
    let below = cgroup.as_str()[tag.as_str().len()..].trim_start_matches('/');
    if below.is_empty() {
        return Some(name.clone());
    }
    Some(below.split('/').fold(name.clone(), |n, part| n.child(part)))
}

/// The agent `cgroup` is attributed to under `tags` (which never nest): its rebased name below
/// the tag that covers it, and the tag's cgroup. None when no tag covers it.
pub fn agent_of<'a>(
    tags: impl IntoIterator<Item = NamedTag<'a>>,
    cgroup: &CgroupPath,
) -> Option<(CgroupPath, &'a CgroupPath)> {
    tags.into_iter()
        .find_map(|t| rebase(cgroup, t.cgroup, t.name).map(|n| (n, t.cgroup)))
}

/// Why a tag may not take a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The cgroup is tagged already, under another name.
    Renamed {
        cgroup: CgroupPath,
        current: CgroupPath,
        wanted: CgroupPath,
    },
    /// The cgroup lies below a tagged cgroup, whose name fixes its own.
    Covered {
        cgroup: CgroupPath,
        tag: CgroupPath,
        derived: CgroupPath,
        wanted: CgroupPath,
    },
    /// The new tag's name (or its cgroup path) equals, contains or lies below the name (or
    /// the cgroup path) of another tag.
    Overlaps {
        /// What of the new tag overlaps: `agent name` or `cgroup`.
        ours_is: &'static str,
        ours: CgroupPath,
        /// What of the other tag it overlaps: its name or its cgroup path.
        theirs: CgroupPath,
        other_cgroup: CgroupPath,
        other_name: CgroupPath,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Renamed {
                cgroup,
                current,
                wanted,
            } => write!(
                f,
                "cgroup {cgroup} is already tagged as {current}, not {wanted}; detach it first \
                 to tag it under another name"
            ),
            Self::Covered {
                cgroup,
                tag,
                derived,
                wanted,
            } => write!(
                f,
                "cgroup {cgroup} is below tagged cgroup {tag} and so runs as {derived}, not \
                 {wanted}; a cgroup below a tag takes its name from the tag"
            ),
            Self::Overlaps {
                ours_is,
                ours,
                theirs,
                other_cgroup,
                other_name,
            } => {
                let relation = if ours == theirs {
                    "is"
                } else if ours.is_ancestor_or_self_of(theirs) {
                    "contains"
                } else {
                    "is below"
                };
                let what = if theirs == other_name {
                    "name"
                } else {
                    "cgroup path"
                };
                write!(
                    f,
                    "{ours_is} {ours} {relation} the {what} of tagged cgroup {other_cgroup}"
                )?;
                if other_cgroup != other_name {
                    write!(f, " (agent {other_name})")?;
                }
                f.write_str(
                    "; the names and paths of tags may not nest, or one agent's policy, handles \
                     and logs would mix with another's; choose a name beside it or detach it \
                     first",
                )
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Checks that `cgroup` may be tagged under `wanted` (its own path when the operator gave no
/// name) given the current `tags`: Ok when it is tagged (or covered) already under that very
/// name, or when it is new and neither its name nor its path nests with another tag's name,
/// nor its name with another tag's path (so an operator's `agents/a` means one agent, whether
/// read as a name or as a path, in `policy show`, `handle mint` and `logs --cgroup`).
pub fn check<'a>(
    tags: impl IntoIterator<Item = NamedTag<'a>> + Clone,
    cgroup: &CgroupPath,
    wanted: &CgroupPath,
) -> Result<(), NameError> {
    if let Some((derived, tag)) = agent_of(tags.clone(), cgroup) {
        if derived == *wanted {
            return Ok(());
        }
        return Err(if tag == cgroup {
            NameError::Renamed {
                cgroup: cgroup.clone(),
                current: derived,
                wanted: wanted.clone(),
            }
        } else {
            NameError::Covered {
                cgroup: cgroup.clone(),
                tag: tag.clone(),
                derived,
                wanted: wanted.clone(),
            }
        });
    }
    let nest =
        |a: &CgroupPath, b: &CgroupPath| a.is_ancestor_or_self_of(b) || b.is_ancestor_or_self_of(a);
    for t in tags {
        // The name against the other's name and its path, and the cgroup's path against the
        // other's name (path against path is the tags' own nesting rule, checked by the caller).
        let pairs = [
            ("agent name", wanted, t.name),
            ("agent name", wanted, t.cgroup),
            ("cgroup", cgroup, t.name),
        ];
        if let Some((ours_is, ours, theirs)) = pairs.into_iter().find(|(_, o, t)| nest(o, t)) {
            return Err(NameError::Overlaps {
                ours_is,
                ours: ours.clone(),
                theirs: theirs.clone(),
                other_cgroup: t.cgroup.clone(),
                other_name: t.name.clone(),
            });
        }
    }
    Ok(())
}

/// The name as one file name (for a pin directory entry): `/` written `%2F`, `%` as `%25`, `@`
/// as `%40`.
pub fn encode(name: &CgroupPath) -> String {
    let mut out = String::with_capacity(name.as_str().len());
    for c in name.as_str().chars() {
        match c {
            '/' => out.push_str("%2F"),
            '%' => out.push_str("%25"),
            '@' => out.push_str("%40"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`encode`]; None for text that is no valid name.
pub fn decode(encoded: &str) -> Option<CgroupPath> {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let c = match rest.get(i + 1..i + 3)? {
            "2F" => '/',
            "25" => '%',
            "40" => '@',
            _ => return None,
        };
        out.push(c);
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    let parsed = CgroupPath::parse(&out).ok()?;
    (parsed.as_str() == out).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> CgroupPath {
        CgroupPath::parse(s).expect(s)
    }

    fn tag<'a>(cgroup: &'a CgroupPath, name: &'a CgroupPath) -> NamedTag<'a> {
        NamedTag { cgroup, name }
    }

    #[test]
    fn the_tag_itself_is_its_name_and_sub_cgroups_keep_their_tail() {
        let runtime = p("machine.slice/libpod-0123abcd.scope");
        let name = p("agents/named");
        assert_eq!(rebase(&runtime, &runtime, &name), Some(name.clone()));
        assert_eq!(
            rebase(&runtime.child("tool"), &runtime, &name),
            Some(p("agents/named/tool"))
        );
        assert_eq!(
            rebase(&runtime.child("tool").child("x"), &runtime, &name),
            Some(p("agents/named/tool/x"))
        );
        // A sibling whose name starts the same is not below the tag.
        assert_eq!(
            rebase(&p("machine.slice/libpod-0123abcd.scope2"), &runtime, &name),
            None
        );
        assert_eq!(rebase(&p("machine.slice"), &runtime, &name), None);
    }

    #[test]
    fn an_unnamed_tag_leaves_paths_as_they_are() {
        let t = p("agents/demo");
        for c in ["agents/demo", "agents/demo/tool"] {
            assert_eq!(rebase(&p(c), &t, &t), Some(p(c)));
        }
    }

    #[test]
    fn agent_of_finds_the_covering_tag() {
        let (a, an) = (p("pods/a-123"), p("agents/a"));
        let b = p("agents/b");
        let tags = [tag(&a, &an), tag(&b, &b)];
        assert_eq!(
            agent_of(tags, &p("pods/a-123/worker")),
            Some((p("agents/a/worker"), &a))
        );
        assert_eq!(
            agent_of(tags, &p("agents/b/x")),
            Some((p("agents/b/x"), &b))
        );
        // The path `agents/a` is no tag's cgroup: it has no agent, whatever the names say.
        assert_eq!(agent_of(tags, &p("agents/a")), None);
    }

    #[test]
    fn same_name_again_is_fine_a_different_one_names_both() {
        let (c, n) = (p("libpod_parent/libpod-77"), p("agents/foo"));
        let tags = [tag(&c, &n)];
        assert_eq!(check(tags, &c, &n), Ok(()));
        let err = check(tags, &c, &p("agents/bar")).expect_err("renamed");
        let text = err.to_string();
        for needed in [
            "libpod_parent/libpod-77",
            "agents/foo",
            "agents/bar",
            "detach",
        ] {
            assert!(text.contains(needed), "{needed}: {text}");
        }
        // Asked without a name: the path is not the name it runs under.
        assert!(matches!(
            check(tags, &c, &c),
            Err(NameError::Renamed { .. })
        ));
    }

    #[test]
    fn below_a_tag_the_name_is_derived() {
        let (c, n) = (p("pods/x"), p("agents/foo"));
        let tags = [tag(&c, &n)];
        assert_eq!(check(tags, &p("pods/x/sub"), &p("agents/foo/sub")), Ok(()));
        let err = check(tags, &p("pods/x/sub"), &p("agents/other")).expect_err("covered");
        assert!(
            matches!(err, NameError::Covered { ref derived, .. } if *derived == p("agents/foo/sub"))
        );
        assert!(err.to_string().contains("agents/foo/sub"), "{err}");
    }

    #[test]
    fn names_may_not_nest_with_other_tags_names_or_paths() {
        let (c, n) = (p("pods/x"), p("agents/foo"));
        let plain = p("agents/plain");
        let tags = [tag(&c, &n), tag(&plain, &plain)];
        let new = p("pods/y");
        for (wanted, relation) in [
            ("agents/foo", "is the name of"),
            ("agents/foo/sub", "is below the name of"),
            ("agents", "contains the name of"),
            ("agents/plain", "is the name of"),
            ("agents/plain/x", "is below the name of"),
        ] {
            let err = check(tags, &new, &p(wanted)).expect_err(wanted);
            assert!(
                matches!(err, NameError::Overlaps { .. }),
                "{wanted}: {err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(relation), "{wanted}: {text}");
            assert!(text.contains(wanted), "{wanted}: {text}");
        }
        // Beside them: fine, also a name that merely starts the same.
        for wanted in ["agents/bar", "agents/foobar", "other/foo"] {
            assert_eq!(check(tags, &new, &p(wanted)), Ok(()), "{wanted}");
        }
        // A plain tag whose path is a name's parent overlaps too.
        let err = check(tags, &p("agents"), &p("agents")).expect_err("parent of a name");
        assert!(
            err.to_string().contains("pods/x (agent agents/foo)"),
            "{err}"
        );
        // A name may not nest with another tag's real path either, nor a new cgroup's path
        // with another tag's name.
        let err = check(tags, &new, &p("pods/x/sub")).expect_err("below a path");
        assert!(
            err.to_string()
                .contains("agent name pods/x/sub is below the cgroup path of tagged cgroup pods/x (agent agents/foo)"),
            "{err}"
        );
        let err = check(tags, &p("agents/foo/real"), &p("other/name")).expect_err("path");
        assert!(
            err.to_string()
                .contains("cgroup agents/foo/real is below the name of tagged cgroup pods/x"),
            "{err}"
        );
    }

    #[test]
    fn names_encode_into_one_file_name_and_back() {
        for raw in ["agents/named", "a%b/c@d", "x", "agents/%2F"] {
            let name = p(raw);
            let enc = encode(&name);
            assert!(!enc.contains('/'), "{enc}");
            assert_eq!(decode(&enc), Some(name), "{raw}");
        }
        for bad in ["", "%2F", "a%2", "a%zz", "..", "a%2F..", "a%2F%2Fb"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
